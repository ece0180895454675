"""TCP connections that the host opens inside a sandbox's network namespace.

A socket belongs to the network namespace of the thread that created it, for its whole
life, whatever thread later uses it. So the host reaches `127.0.0.1:<port>` of a sandbox
(the port proxy's byte path) by creating the socket in a thread that has entered the
sandbox's namespace with setns(2), then connecting it from the event loop. That works
with network "none": the sandbox needs no interface but loopback, no route and no uplink,
and the connection is inbound, not outbound.

The thread is one dedicated worker that does nothing else: it never has to go back to
the host's namespace, so no other code (a database connection, an HTTP call) can ever
run in a sandbox's namespace by mistake. setns needs CAP_SYS_ADMIN in the host's user
namespace: as root; without it `connect_port` raises PermissionError, and the sandbox
is reached through its guest agent instead (`corral.isolation.guest_socket`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from corral.errors import IsolationUnavailable, PortClosed
from corral.network.setns import enter_netns

# Nothing listens there (or, for ::1, no IPv6 in the sandbox).
_NOT_THERE = (
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EADDRNOTAVAIL,
    errno.ENETUNREACH,
)  # fmt: skip
# One thread, only for this: it stays in the namespace of the last sandbox it entered.
# (`corral.network.setns.run_in_netns` starts a thread per call, for occasional sockets:
# 1.2 ms p50 a socket against 0.06 ms here, measured on 2 busy cores; the port proxy
# makes one per connection.)
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-netns")


def _socket_in(netns_fd: int, family: int) -> socket.socket:
    # Through the open descriptor, not /proc/PID: it is the namespace checked against
    # pid reuse (`open_netns`), whatever the pid names by now.
    enter_netns(f"/proc/self/fd/{netns_fd}")
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setblocking(False)
    return sock


def open_netns(pid: int, still_ours: Callable[[], bool]) -> int:
    """A file descriptor of process `pid`'s network namespace, or -1 when that process
    is gone. `still_ours()` is asked after the open: a pid can be reused once its process
    is reaped, so the caller says it has not been (its parent still has it). The host's
    own namespace is refused (IsolationUnavailable)."""
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return -1
    if not still_ours():
        os.close(fd)
        return -1
    if os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
        os.close(fd)
        # Its 127.0.0.1 is the host's: it would reach the host's and other sandboxes'
        # services, never only its own.
        raise IsolationUnavailable(
            "this sandbox has no network namespace of its own (process tier): its ports "
            "cannot be exposed; use the namespace tier"
        )
    return fd


async def connect_port(netns_fd: int, port: int, *, where: str) -> socket.socket:
    """A non-blocking TCP socket connected to 127.0.0.1:`port` (else [::1]:`port`: a
    server on "localhost" may be on ::1 alone) in the network namespace `netns_fd` (the
    caller closes both). `where` names the sandbox in errors; PermissionError when this
    process may not enter the namespace."""
    loop = asyncio.get_running_loop()
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = await loop.run_in_executor(_worker, _socket_in, netns_fd, family)
        try:
            await loop.sock_connect(sock, (host, port))
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in _NOT_THERE:
                raise
        except BaseException:
            sock.close()
            raise
    raise PortClosed(
        f"nothing listens on port {port} in {where}: start a server there on "
        f"0.0.0.0:{port} or 127.0.0.1:{port}"
    )
