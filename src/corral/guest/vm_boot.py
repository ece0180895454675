"""The last step of a microVM's boot, inside the guest: prepare the sandbox, become the agent.

The guest's init (`corral.isolation.guest_kernel.INIT`) mounts the sandbox's root and
execs this, as PID 1 with stdin and stdout on the agent's virtio-serial port, passing
the raw disk that holds the sandbox's configuration (`corral.isolation.microvm`
writes it): its host name, the template's default user, workdir, environment and the
agent's arguments. It does in the guest what the namespace tier does on the host for a
layer template's sandbox — the host name and its /etc entries, the `user` account,
/workspace, /home/user and /tmp, and for a sandbox with a network its address, routes
and resolver (`corral.isolation.microvm_net`) — then runs the agent in this same process (one Python
start, not two). Standard library only; the host's interpreter runs it from /.corral.
"""

from __future__ import annotations

import _socket
import os
import pwd
import sys

SANDBOX_UID = 1000
SANDBOX_USER = "user"
CONFIG_MAGIC = b"corral-vm-config\n"


def read_config(device: str) -> list[str]:
    """The NUL-separated fields the host wrote after `CONFIG_MAGIC` and a length line."""
    with open(device, "rb") as f:
        head = f.read(len(CONFIG_MAGIC) + 16)
        if not head.startswith(CONFIG_MAGIC):
            raise SystemExit("corral-vm-boot: the configuration disk is not Corral's")
        length_line, _, rest = head[len(CONFIG_MAGIC) :].partition(b"\n")
        length = int(length_line)
        data = rest + f.read(length - len(rest))
    return [field.decode() for field in data[:length].split(b"\0")]


def _append(path: str, number: int, line: str) -> None:
    """Add `line` to /etc/passwd or /etc/group unless an entry has id `number`."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if any(entry.split(":")[2:3] == [str(number)] for entry in text.splitlines()):
        return
    if not os.path.isdir("/etc"):
        os.mkdir("/etc", 0o755)
    with open(path, "a") as f:
        f.write(("" if not text or text.endswith("\n") else "\n") + line)


def _own_dir(path: str, mode: int, uid: int, gid: int) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _network(field: str) -> None:
    """Configure eth0 from the config disk's `net ADDR4 GATEWAY4 ADDR6 GATEWAY6` field
    (with the agent image's busybox: the template may have no `ip`), and point the
    resolver at the gateway, where the host redirects DNS to the sandbox's resolver."""
    _, address4, gateway4, address6, gateway6 = field.split()
    with open("/proc/sys/net/ipv6/conf/eth0/accept_dad", "w") as f:
        f.write("0")  # the address is usable at once; the link has no one else
    busybox = os.path.join(os.path.dirname(os.path.abspath(__file__)), "busybox")
    for argv in (
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "addr", "add", address4, "dev", "eth0"],
        ["ip", "route", "add", "default", "via", gateway4],
        ["ip", "-6", "addr", "add", address6, "dev", "eth0"],
        ["ip", "-6", "route", "add", "default", "via", gateway6],
    ):
        pid = os.posix_spawn(busybox, [busybox, *argv], {})
        if os.waitpid(pid, 0)[1] != 0:
            raise SystemExit(f"corral-vm-boot: could not configure the network: {argv}")
    if os.path.islink("/etc/resolv.conf"):  # a template's link to a resolver it lacks
        os.unlink("/etc/resolv.conf")
    with open("/etc/resolv.conf", "w") as f:
        f.write(f"nameserver {gateway4}\noptions edns0\n")


def _user(name: str) -> tuple[int, int, str]:
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid, entry.pw_dir or "/"
    except KeyError:
        if name.isdigit():
            return int(name), int(name), "/"
        raise SystemExit(
            f"corral-vm-boot: the template runs as user {name!r}, which its /etc/passwd "
            "does not have"
        ) from None


def main() -> None:
    fields = read_config(sys.argv[1])
    hostname, user, workdir, count = fields[0], fields[1], fields[2], int(fields[3])
    args = fields[4 : 4 + count]
    env = dict(entry.split("=", 1) for entry in fields[4 + count :] if "=" in entry)
    for entry in fields[4 + count :]:
        if entry.startswith("net "):
            _network(entry)
    _socket.sethostname(hostname)  # not `socket`: it imports enum, ~0.1 s under TCG
    with open("/etc/hostname", "w") as f:
        f.write(hostname + "\n")
    with open("/etc/hosts", "w") as f:
        f.write(f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n")
    shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    home = f"/home/{SANDBOX_USER}"
    _append("/etc/passwd", SANDBOX_UID, f"{SANDBOX_USER}:x:1000:1000::{home}:{shell}\n")
    _append("/etc/group", SANDBOX_UID, f"{SANDBOX_USER}:x:{SANDBOX_UID}:\n")
    uid, gid, user_home = _user(user)
    _own_dir(home, 0o755, SANDBOX_UID, SANDBOX_UID)
    _own_dir("/workspace", 0o755, uid, gid)
    _own_dir("/tmp", 0o1777, 0, 0)
    name = user if not user.isdigit() else SANDBOX_USER
    os.environ.clear()
    os.environ.update({"HOME": user_home, "USER": name, "LOGNAME": name, "SHELL": shell, **env})
    import agent  # type: ignore[import-not-found]  # beside this file (on the path)

    agent.main([*args, "--workdir", workdir, "--user", f"{uid}:{gid}"])


if __name__ == "__main__":
    main()
