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


def _shares(fields: list[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """The host directories to mount (`corral.isolation.microvm_shares.mount_fields`:
    a count, then tag, path and ro/rw of each) and the fields after them."""
    count = int(fields[0]) if fields else 0
    shares = [(fields[1 + 3 * i], fields[2 + 3 * i], fields[3 + 3 * i]) for i in range(count)]
    return shares, fields[1 + 3 * count :]


def _files(fields: list[str]) -> tuple[list[tuple[str, int, bytes]], list[str]]:
    """A one-shot sandbox's seed files (`corral.isolation.microvm_oneshot.fields`: a
    count, then path, octal mode and hex content of each) and the fields after them."""
    count = int(fields[0]) if fields else 0
    files = [
        (fields[1 + 3 * i], int(fields[2 + 3 * i], 8), bytes.fromhex(fields[3 + 3 * i]))
        for i in range(count)
    ]
    return files, fields[1 + 3 * count :]


def _port(name: str, flags: int = os.O_WRONLY) -> int:
    """The virtio-serial port `name`, open for writing (or as `flags` say)."""
    for entry in os.listdir("/sys/class/virtio-ports"):
        with open(f"/sys/class/virtio-ports/{entry}/name") as f:
            if f.read().strip() == name:
                return os.open(f"/dev/{entry}", flags)
    raise SystemExit(f"corral-vm-boot: no port {name}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _one_shot(
    argv: list[str], workdir: str, files: list[tuple[str, int, bytes]], uid: int, gid: int
) -> None:
    """Run the command as the sandbox's user (seed files written and workdir made as it,
    as bubblewrap does on the namespace tier), copy its output to the ports, write its
    status on `corral.exit` and stop the VM. Never returns."""
    import select  # here: the agent's boot does not pay for it

    # The directories that are missing are made the user's, as bubblewrap makes them: a
    # file's parents with its mode, plus the owner's bits and search where it is readable.
    dirs = [(os.path.dirname(path), _parent_mode(mode)) for path, mode, _ in files]
    for path, mode in [*dirs, (workdir, 0o755)]:
        made = ""
        for part in path.strip("/").split("/"):
            made += "/" + part
            if part and not os.path.lexists(made):
                os.mkdir(made)
                os.chown(made, uid, gid)
                os.chmod(made, mode)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.setsid()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            for path, mode, content in files:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
                _write_all(fd, content)
                os.fchmod(fd, mode)
                os.close(fd)
            os.chdir(workdir)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (null, out_r, out_w, err_r, err_w):
                os.close(fd)
        except OSError as exc:
            os.write(2, f"corral-vm: could not prepare the command: {exc}\n".encode())
            os._exit(1)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"corral-vm: execvp {argv[0]}: {exc.strerror}\n".encode())
        os._exit(1)
    os.close(out_w)
    os.close(err_w)
    ports = {out_r: 1, err_r: _port("corral.stderr")}
    signals = _port("corral.signal", os.O_RDONLY | os.O_NONBLOCK)
    done = os.pidfd_open(child)
    status = None
    while ports and status is None:
        for fd in select.select([*ports, done, signals], [], [])[0]:
            if fd == done:
                status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
            elif fd == signals:
                _forward_signals(signals, child)
            elif data := os.read(fd, 65536):
                _write_all(ports[fd], data)
            else:
                del ports[fd]
    if status is None:  # it closed both pipes before it ended
        status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    # It ended: what its pipes hold is the rest of its output (processes it left that
    # still hold them end with the VM, as on namespace with the sandbox's init).
    for fd, port in ports.items():
        os.set_blocking(fd, False)
        while data := _read_now(fd):
            _write_all(port, data)
    code = 128 - status if status < 0 else status
    exit_port = _port("corral.exit")
    _write_all(exit_port, f"{code}\n".encode())
    os.close(exit_port)
    busybox = os.path.join(os.path.dirname(os.path.abspath(__file__)), "busybox")
    os.execv(busybox, ["reboot", "-f"])  # QEMU runs with -no-reboot: the VM stops


def _forward_signals(port: int, child: int) -> None:
    """Send the command (or, with GROUP 1, its session's group: it leads it) the signals
    the host wrote on the port, one `SIGNUM GROUP` line each."""
    for line in _read_now(port).decode(errors="replace").splitlines():
        try:
            signum, group = (int(word) for word in line.split())
            (os.killpg if group else os.kill)(child, signum)
        except (ValueError, OSError):  # a malformed line, or the command is gone
            continue


def _parent_mode(mode: int) -> int:
    """bubblewrap's mode for the directories it makes above a file of `mode`."""
    parent = (mode & 0o777) | 0o700
    parent |= 0o010 if parent & 0o040 else 0
    parent |= 0o001 if parent & 0o004 else 0
    return parent


def _read_now(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _mount_share(tag: str, path: str, read_only: bool) -> None:
    """Mount the virtio-fs share `tag` at `path` (made if missing), as the namespace tier
    binds a volume: nosuid, nodev, read-only when asked."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    options = "nosuid,nodev" + (",ro" if read_only else "")
    busybox = os.path.join(os.path.dirname(os.path.abspath(__file__)), "busybox")
    argv = ["mount", "-t", "virtiofs", "-o", options, tag, path]
    if os.spawnv(os.P_WAIT, busybox, argv) != 0:
        raise SystemExit(f"corral-vm-boot: could not mount {tag} at {path}")


def main() -> None:
    fields = read_config(sys.argv[1])
    hostname, user, workdir, count = fields[0], fields[1], fields[2], int(fields[3])
    args = fields[4 : 4 + count]
    shares, rest = _shares(fields[4 + count :])
    files, rest = _files(rest)
    env = dict(entry.split("=", 1) for entry in rest if "=" in entry)
    for entry in rest:
        if entry.startswith("net "):
            _network(entry)
    for tag, path, mode in shares:  # the template's own tree (the host's /usr): first
        if mode == "base":
            _mount_share(tag, path, True)
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
    for tag, path, mode in shares:  # last: a volume may be inside /workspace or the home
        if mode != "base":
            _mount_share(tag, path, mode == "ro")
    name = user if not user.isdigit() else SANDBOX_USER
    os.environ.clear()
    os.environ.update({"HOME": user_home, "USER": name, "LOGNAME": name, "SHELL": shell, **env})
    if args:  # a one-shot sandbox: its command, not the agent
        _one_shot(args, workdir, files, uid, gid)
    import agent  # type: ignore[import-not-found]  # beside this file (on the path)

    agent.main([*args, "--workdir", workdir, "--user", f"{uid}:{gid}"])


if __name__ == "__main__":
    main()
