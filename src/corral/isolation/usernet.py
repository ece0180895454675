"""A sandbox's network without root: a holder's namespaces and a slirp4netns uplink.

A server that is not root cannot make veth pairs or NAT. Per sandbox it starts a holder
(`corral.isolation.nsholder`) in a new user namespace (the server's uid is root there)
owning a new network namespace, has it load the sandbox's rules, then attaches
slirp4netns to that namespace: a user-mode TCP/IP stack whose connections out are
ordinary sockets of the server's uid in the server's own namespace. Rules first, uplink
second: no packet leaves before the policy is in. The sandbox (bubblewrap) is launched
inside the holder's namespaces (`nsenter --user --net`) and makes its own child user
namespace there, so code in it holds no capability over the holder's namespace.

slirp4netns's own addresses and the host's are the two holes the policy must close:
its gateway and DNS (10.0.2.2, 10.0.2.3, fd00::2, fd00::3; private ranges, denied
anyway) would be the host's loopback without `--disable-host-loopback`, and every
address of the host's interfaces is reached as the host itself: they go in the deny sets
(`host_networks`). DNS goes only to the sandbox's resolver, on its loopback.

slirp4netns parses every packet the sandbox sends: it runs with its own seccomp filter
(`--enable-seccomp`). (Its `--enable-sandbox` fails in a user namespace made this way:
"setegid(0)", slirp4netns 1.2.0.)

Why slirp4netns (docs/network-plan.md section 2): it attaches in ~4 ms against ~50 ms for
Debian 12's pasta, and carries IPv6 with `--enable-ipv6`.

The footprint records the holder and slirp4netns (pid and start time) before the
sandbox starts; `Footprint.release` (and the reaper) kill what is left. Both also end on
their own when the server dies: the holder at the end of its socket pair, slirp4netns
when its exit pipe closes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import select
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.errors import SandboxStartFailed
from corral.isolation import nsholder
from corral.isolation.footprint import process_start_time

if TYPE_CHECKING:
    from corral.isolation.footprint import Footprint

# The sandbox's IPv6 address in slirp4netns's network, and its gateway (set, not learned).
SANDBOX_V6, GATEWAY_V6 = "fd00::100", "fd00::2"
# slirp4netns's gateway (the host, as seen from the sandbox) and DNS forwarder.
SLIRP_ADDRESSES = tuple(
    ipaddress.ip_network(a) for a in ("10.0.2.2", "10.0.2.3", "fd00::2", "fd00::3")
)
_READY_TIMEOUT = 10.0


def host_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Every address of this (the server's) network namespace's interfaces, as /32 and
    /128 networks, and slirp4netns's own: what a rootless sandbox must never reach."""
    found: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set(SLIRP_ADDRESSES)
    found.update(ipaddress.ip_network(a) for a in _local_ipv4())
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                digits = line.split()[0]
                found.add(ipaddress.ip_network(ipaddress.IPv6Address(int(digits, 16))))
    except FileNotFoundError:
        pass  # no IPv6 here
    return sorted(found, key=lambda n: (n.version, n))


def _local_ipv4() -> Iterator[str]:
    # The kernel's local table: each "|-- ADDRESS" followed by "/32 host LOCAL".
    with open("/proc/net/fib_trie") as f:
        lines = f.read().splitlines()
    for previous, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            yield previous.split("|--")[1].strip()


@dataclass
class UserNet:
    """A rootless sandbox's holder and uplink, while they live."""

    holder: nsholder.HolderClient
    holder_process: subprocess.Popen[bytes]
    slirp: subprocess.Popen[bytes] | None = None
    exit_fd: int = -1  # slirp4netns ends when this, our end of its exit pipe, closes

    def close(self) -> None:
        """End the uplink and the holder (the namespaces go with the holder)."""
        self.holder.close()
        if self.exit_fd >= 0:
            os.close(self.exit_fd)
            self.exit_fd = -1
        for process in (self.slirp, self.holder_process):
            if process is None:
                continue
            try:
                process.wait(2.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start(footprint: Footprint, python: str) -> UserNet:
    """Start the sandbox's holder and return at once (its interpreter starts while the
    sandbox's launch is prepared); record it, and name its namespaces in the footprint
    (two symbolic links in the sandbox's directory, to the holder's /proc entries). The
    holder is stdlib-only: the guest agent's `python` runs it, a system one outside any
    virtualenv (which the holder's user namespace may not be allowed to read). The
    caller `close`s what it returns, whatever happens next."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with open(footprint.path / "holder.log", "wb") as stderr:
            process = subprocess.Popen(
                [
                    shutil.which("unshare") or "unshare",
                    "--user", "--map-root-user", "--net", "--",
                    python, "-I", "-S", nsholder.__file__, str(theirs.fileno()),
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(theirs.fileno(),), start_new_session=True,
            )  # fmt: skip
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    net = UserNet(nsholder.HolderClient(ours), process)
    try:
        _record(footprint, process.pid)
        for name in ("net", "user"):
            os.symlink(f"/proc/{process.pid}/ns/{name}", footprint.path / f"{name}ns")
        footprint.netns = str(footprint.path / "netns")
        footprint.userns = str(footprint.path / "userns")
        footprint.save()
    except BaseException:
        net.close()
        raise
    return net


def build(net: UserNet, footprint: Footprint, script: str) -> None:
    """Load `script` (the sandbox's nft rules) in `net`'s holder, then attach
    slirp4netns and give the uplink its IPv6 address. Blocking."""
    try:
        net.holder.nft(script)
    except nsholder.NftError as exc:
        raise SandboxStartFailed(f"loading the sandbox's network rules failed: {exc}") from exc
    except OSError as exc:  # the holder is gone: what did it say?
        with contextlib.suppress(subprocess.TimeoutExpired):
            net.holder_process.wait(_READY_TIMEOUT)
        said = (footprint.path / "holder.log").read_text(errors="replace").strip()
        raise SandboxStartFailed(
            f"could not make the sandbox's network namespace: {exc} {said}".strip()
        ) from exc
    _attach(footprint, net, net.holder_process.pid)
    net.holder.ipv6("tap0", SANDBOX_V6, 64, GATEWAY_V6)


def _attach(footprint: Footprint, net: UserNet, pid: int) -> None:
    ready_r, ready_w = os.pipe()
    exit_r, net.exit_fd = os.pipe()
    log = footprint.path / "slirp4netns.log"
    try:
        with open(log, "wb") as stderr:
            net.slirp = subprocess.Popen(
                [
                    shutil.which("slirp4netns") or "slirp4netns",
                    "--configure", "--mtu=65520", "--disable-host-loopback",
                    "--enable-seccomp",
                    "--enable-ipv6", f"--ready-fd={ready_w}", f"--exit-fd={exit_r}",
                    f"--userns-path=/proc/{pid}/ns/user", "--netns-type=path",
                    f"/proc/{pid}/ns/net", "tap0",
                ],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(ready_w, exit_r), start_new_session=True,
            )  # fmt: skip
        os.close(ready_w)
        ready_w = -1
        _record(footprint, net.slirp.pid)
        readable, _, _ = select.select([ready_r], [], [], _READY_TIMEOUT)
        if not readable or os.read(ready_r, 1) != b"1":
            said = log.read_text(errors="replace").strip() or "no word from it"
            raise SandboxStartFailed(
                f"slirp4netns could not give the sandbox its uplink: {said}"
                + (" (is /dev/net/tun usable by this user?)" if "tun" in said else "")
            )
    finally:
        for fd in (ready_r, ready_w, exit_r):
            if fd >= 0:
                os.close(fd)


def _record(footprint: Footprint, pid: int) -> None:
    start = process_start_time(pid)
    if start is not None:
        footprint.processes.append([pid, start])
        footprint.save()
