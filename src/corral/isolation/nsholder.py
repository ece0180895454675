"""The holder of a rootless sandbox's network namespace, and the server's handle on it.

Without root, the server cannot make a network namespace of the host's user namespace,
nor enter one (setns needs CAP_SYS_ADMIN in the caller's own user namespace, and a
multithreaded process may not change user namespace). So per sandbox it starts this file
as a small program under `unshare --user --map-root-user --net`: a new user namespace in
which the server's uid is root, owning a new network namespace. The holder lives as long
as the sandbox and does, as that root, what needs a capability over the namespace:

- loads nft scripts (libnftables in-process, one transaction each);
- makes sockets there (the resolver's, the NFLOG reader's) and hands them to the server
  over its socket pair (SCM_RIGHTS): a socket stays in the namespace it was made in;
- gives the uplink its IPv6 address and route at once (`ipv6`): the namespace takes no
  router advertisement and does no duplicate detection, which would leave a sandbox
  without IPv6 for its first seconds.

The server talks to it over a SOCK_SEQPACKET pair, one JSON request per message, one
answer per message (a socket rides along as ancillary data). The holder exits when the
server's end closes, so a server that dies (even by SIGKILL) leaves no holder behind.

This module is stdlib-only and imports nothing of corral: the holder runs it as a script
(`python -I -S nsholder.py FD`), which keeps its start short.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import functools
import importlib.util
import ipaddress
import json
import os
import socket
import struct
import sys
import threading
from typing import Any

_NFT_CTX_OUTPUT_JSON = 1 << 4
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_MESSAGE = 1 << 20  # an nft script or its JSON listing fits


class NftError(Exception):
    """libnftables refused a script (the message is its error output)."""


@functools.cache
def _libnftables() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError:
        return None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for name in ("nft_ctx_get_error_buffer", "nft_ctx_get_output_buffer"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    return lib


def libnftables_present() -> bool:
    return _libnftables() is not None


def run_nft(script: str, *, json_output: bool = False) -> str:
    """Run an nft script in the calling thread's network namespace, as one transaction;
    its output. NftError when refused, OSError when libnftables is missing."""
    lib = _libnftables()
    if lib is None:
        raise OSError("libnftables is missing: apt-get install nftables")
    ctx = lib.nft_ctx_new(0)
    if not ctx:
        raise OSError("libnftables could not make a context")
    try:
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        if json_output:
            lib.nft_ctx_output_set_flags(ctx, _NFT_CTX_OUTPUT_JSON)
        if lib.nft_run_cmd_from_buffer(ctx, script.encode()) != 0:
            raise NftError((lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace"))
        return (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
    finally:
        lib.nft_ctx_free(ctx)


class HolderClient:
    """The server's end of one holder's socket pair. Thread-safe: one request at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def _ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            self._sock.sendall(json.dumps(request).encode())
            fds = array.array("i")
            data, ancillary, _flags, _addr = self._sock.recvmsg(
                _MESSAGE, socket.CMSG_SPACE(fds.itemsize)
            )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            raise OSError("the sandbox's network holder is gone")
        answer: dict[str, Any] = json.loads(data)
        if "error" in answer:
            for fd in fds:
                os.close(fd)
            if answer.get("nft"):
                raise NftError(answer["error"])
            raise OSError(answer.get("errno", 0), answer["error"])
        return answer, list(fds)

    def nft(self, script: str, *, json_output: bool = False) -> str:
        """`run_nft(script)` inside the holder's namespace."""
        answer, _ = self._ask({"op": "nft", "script": script, "json": json_output})
        return str(answer["output"])

    def socket(
        self,
        family: int,
        kind: int,
        proto: int = 0,
        *,
        bind: tuple[str, int] | None = None,
        listen: int | None = None,
    ) -> socket.socket:
        """A socket made inside the holder's namespace (bound and listening when asked),
        non-blocking; the caller owns it."""
        request = {"op": "socket", "family": family, "kind": kind, "proto": proto}
        _, fds = self._ask({**request, "bind": bind, "listen": listen})
        (fd,) = fds
        made = socket.socket(fileno=fd)
        made.setblocking(False)
        return made

    def ipv6(self, link: str, address: str, prefix: int, gateway: str) -> None:
        """`address`/`prefix` on `link` and the default route through `gateway`."""
        request = {"address": address, "prefix": prefix, "gateway": gateway}
        self._ask({"op": "ipv6", "link": link, **request})

    def close(self) -> None:
        """Close the server's end: the holder exits."""
        self._sock.close()


def _set_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack_from("16xH", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[0]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | _IFF_UP))


def _rtnetlink() -> Any:
    """corral.isolation.rtnetlink (stdlib-only), loaded from beside this file."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rtnetlink.py")
    spec = importlib.util.spec_from_file_location("corral_rtnetlink", here)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _answer(request: dict[str, Any]) -> tuple[dict[str, Any], socket.socket | None]:
    if request["op"] == "ipv6":
        with _rtnetlink().netlink() as link:
            address = ipaddress.IPv6Address(request["address"])
            link.add_address(request["link"], address, request["prefix"])
            link.add_default_route(request["link"], ipaddress.IPv6Address(request["gateway"]))
        return {}, None
    if request["op"] == "nft":
        return {"output": run_nft(request["script"], json_output=request["json"])}, None
    if request["op"] == "socket":
        made = socket.socket(request["family"], request["kind"], request["proto"])
        try:
            if request["family"] != socket.AF_NETLINK:
                made.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if request["bind"] is not None:
                made.bind(tuple(request["bind"]))
            if request["listen"] is not None:
                made.listen(request["listen"])
        except BaseException:
            made.close()
            raise
        return {}, made
    raise ValueError(f"unknown request {request['op']!r}")


def serve(channel: socket.socket) -> None:
    """The holder's loop: answer requests until the server's end closes."""
    _set_up("lo")
    # For the links made from now on (the uplink): addresses set, never learned.
    for knob in ("accept_ra", "accept_dad"):
        with open(f"/proc/sys/net/ipv6/conf/default/{knob}", "w") as f:
            f.write("0\n")
    while request := channel.recv(_MESSAGE):
        made: socket.socket | None = None
        try:
            answer, made = _answer(json.loads(request))
        except NftError as exc:
            answer = {"error": str(exc), "nft": True}
        except OSError as exc:
            answer = {"error": str(exc), "errno": exc.errno or 0}
        except Exception as exc:  # a bad request: said, and the holder carries on
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(answer).encode()
        if made is None:
            channel.sendall(data)
        else:
            fds = array.array("i", [made.fileno()])
            channel.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
            made.close()


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
