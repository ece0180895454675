"""Reading the packets an nftables `log group N` rule logs (nfnetlink_log, "NFLOG"), from a
netlink socket opened inside a sandbox's network namespace, on the event loop.

The kernel copies each logged packet's first bytes to the socket bound to the group;
we keep only what an event needs: the rule's prefix, and the destination (protocol,
address, port) from the packet's IP and TCP/UDP headers. No dependency: the netlink
messages are a few fixed headers and TLVs (linux/netfilter/nfnetlink_log.h).

Python 3.11 has no `os.setns`: the socket is made in a short-lived thread of its own
that enters the namespace with libc's setns(2); a socket stays in the namespace it was
made in, and the thread (whose namespace changed) ends with the call.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.network.setns import enter_netns

log = logging.getLogger("corral.network")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = NFNL_SUBSYS_ULOG << 8 | 0
NFULNL_MSG_CONFIG = NFNL_SUBSYS_ULOG << 8 | 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH = 1, 2, 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_TYPE_MASK = 0x3FFF  # without the NESTED and NET_BYTEORDER flags
_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_NFGENMSG = struct.Struct("!BBH")  # family, version, group (big-endian)
_NLATTR = struct.Struct("=HH")  # length, type
# Enough of each packet for an IPv6 header, a few extension headers and TCP/UDP ports.
COPY_BYTES = 128
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options


@dataclass(frozen=True)
class LogRecord:
    """One logged packet: which rule logged it (its prefix) and where it was going."""

    prefix: str
    protocol: str  # "tcp", "udp", "icmp", "icmpv6", or the IP protocol number
    address: str
    port: int  # 0 for protocols without ports


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attributes(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + _NLATTR.size : offset + length]
        offset += _align(length)


def _attribute(kind: int, value: bytes) -> bytes:
    return _NLATTR.pack(_NLATTR.size + len(value), kind) + value.ljust(_align(len(value)), b"\0")


def destination(packet: bytes) -> tuple[str, str, int] | None:
    """(protocol, address, port) of an IPv4 or IPv6 packet; None when it is cut short."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        start, number = (packet[0] & 0x0F) * 4, packet[9]
        address = str(ipaddress.IPv4Address(packet[16:20]))
    elif version == 6 and len(packet) >= 40:
        start, number = 40, packet[6]
        address = str(ipaddress.IPv6Address(packet[24:40]))
        while number in _IPV6_EXTENSIONS and len(packet) >= start + 8:
            number, start = packet[start], start + (packet[start + 1] + 1) * 8
    else:
        return None
    protocol = PROTOCOLS.get(number, str(number))
    port = 0
    if protocol in ("tcp", "udp") and len(packet) >= start + 4:
        port = struct.unpack_from("!H", packet, start + 2)[0]
    return protocol, address, port


def parse(data: bytes) -> Iterator[LogRecord]:
    """The log records in one netlink datagram (it may hold several messages)."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            return
        if kind == NFULNL_MSG_PACKET:
            prefix, found = "", None
            body = offset + _NLMSGHDR.size + _NFGENMSG.size
            for attr, value in _attributes(data[: offset + length], body):
                if attr == NFULA_PREFIX:
                    prefix = value.split(b"\0", 1)[0].decode(errors="replace")
                elif attr == NFULA_PAYLOAD:
                    found = destination(value)
            if found is not None:
                yield LogRecord(prefix, *found)
        offset += _align(length)


def _configure(sock: socket.socket, group: int) -> None:
    """Bind the socket to `group`, copying packets' first COPY_BYTES, each record sent
    as soon as it is logged; raise what the kernel refuses (EBUSY: another socket has
    the group)."""
    requests = [
        _attribute(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])),
        _attribute(NFULA_CFG_MODE, struct.pack("!IBB", COPY_BYTES, NFULNL_COPY_PACKET, 0)),
        # By default the kernel holds records until 100 are queued or a second passed: a
        # sandbox ending within that second would lose its last connections' details.
        # The log rules are rate limited, so one message per record costs little.
        _attribute(NFULA_CFG_QTHRESH, struct.pack("!I", 1)),
    ]
    for seq, attribute in enumerate(requests, 1):
        body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, group) + attribute
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, 0
        )
        sock.send(header + body)
        reply = sock.recv(4096)
        _length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(reply)
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", reply, _NLMSGHDR.size)
            if code:
                raise OSError(-code, f"NFLOG group {group}: {os.strerror(-code)}")


def _open_in(netns: Path, group: int) -> socket.socket:
    """A bound NFLOG socket made inside the network namespace at `netns` (runs in a thread
    of its own: setns changes the calling thread)."""
    enter_netns(str(netns))
    return _prepare(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER), group)


def _prepare(sock: socket.socket, group: int) -> socket.socket:
    """`sock`, a NETLINK_NETFILTER socket, bound to `group` and made non-blocking; closed
    if that fails."""
    try:
        sock.setblocking(True)
        sock.bind((0, 0))
        _configure(sock, group)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class NflogReader:
    """The NFLOG records of one group in one network namespace.

    reader = NflogReader.open(Path("/proc/1234/ns/net"), group=1)
    async for record in reader.records(): ...
    reader.close()   # once the task reading `records` is done or cancelled

    One reader per group per namespace: the kernel refuses a second bind (EBUSY).
    """

    def __init__(self, sock: socket.socket, group: int) -> None:
        self._sock = sock
        self.group = group
        # Records the kernel dropped because the socket's buffer was full (ENOBUFS
        # says so, not how many): the count of times it happened.
        self.overruns = 0

    @classmethod
    def open(cls, netns: Path | str, group: int) -> NflogReader:
        """Bind to `group` inside the namespace at `netns` (e.g. /proc/PID/ns/net or
        /run/netns/NAME). Blocks for the time it takes a thread to start (~0.1 ms)."""
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"NFLOG group {group} is out of range: use 0 to 65535")
        result: list[socket.socket | BaseException] = []

        def run() -> None:
            try:
                result.append(_open_in(Path(netns), group))
            except BaseException as exc:  # handed to the caller
                result.append(exc)

        thread = threading.Thread(target=run, name=f"nflog-open-{group}", daemon=True)
        thread.start()
        thread.join()
        (made,) = result
        if isinstance(made, BaseException):
            raise made
        return cls(made, group)

    @classmethod
    def adopt(cls, sock: socket.socket, group: int) -> NflogReader:
        """Bind to `group` with `sock`, a NETLINK_NETFILTER socket made inside the
        namespace by a process allowed to (a rootless sandbox's holder); it is then ours."""
        return cls(_prepare(sock, group), group)

    async def records(self) -> AsyncIterator[LogRecord]:
        """Every record from now on, as the kernel sends them, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self._sock, 65536)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                log.warning("NFLOG records lost (socket buffer full)", extra={"group": self.group})
                continue
            for record in parse(data):
                yield record

    def pending(self) -> list[LogRecord]:
        """The records the socket already holds, without waiting (for a last read once
        the task reading `records` is stopped: a record is sent as its packet is logged)."""
        found: list[LogRecord] = []
        while True:
            try:
                data = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            found.extend(parse(data))

    def close(self) -> None:
        self._sock.close()
