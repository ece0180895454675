"""The few route-netlink requests a sandbox's uplink needs, made in-process.

A veth pair, addresses, links up, default routes, and a link's removal: what
`ip link/addr/route` would do, without spawning `ip` (each exec costs milliseconds of a
sandbox's start). Requests go to the network namespace of the calling thread; each waits
for the kernel's acknowledgement and raises OSError with its errno on a refusal.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_NLMSG_ERROR = 2
_RTM_NEWLINK, _RTM_DELLINK, _RTM_NEWADDR, _RTM_NEWROUTE = 16, 17, 20, 24
_IFLA_IFNAME, _IFLA_LINKINFO, _IFLA_NET_NS_FD = 3, 18, 28
_IFLA_INFO_KIND, _IFLA_INFO_DATA, _VETH_INFO_PEER = 1, 2, 1
_IFA_ADDRESS, _IFA_LOCAL, _IFA_F_NODAD = 1, 2, 0x02
_RTA_OIF, _RTA_GATEWAY = 4, 5
_RT_TABLE_MAIN, _RTPROT_BOOT, _RTN_UNICAST = 254, 3, 1
_IFF_UP = 0x1
_NESTED = 0x8000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Netlink:
    """A route-netlink socket in the calling thread's network namespace."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def add_veth(self, name: str, peer: str, peer_netns_fd: int) -> None:
        """A veth pair: `name` here, `peer` in the namespace open at `peer_netns_fd`."""
        peer_info = _ifinfo() + _attr(_IFLA_IFNAME, _name(peer))
        peer_info += _attr(_IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
        data = _attr(_VETH_INFO_PEER | _NESTED, peer_info)
        info = _attr(_IFLA_INFO_KIND, b"veth\0") + _attr(_IFLA_INFO_DATA | _NESTED, data)
        body = _ifinfo() + _attr(_IFLA_IFNAME, _name(name)) + _attr(_IFLA_LINKINFO | _NESTED, info)
        self._request(_RTM_NEWLINK, _NLM_F_CREATE | _NLM_F_EXCL, body)

    def delete_link(self, name: str) -> None:
        self._request(_RTM_DELLINK, 0, _ifinfo() + _attr(_IFLA_IFNAME, _name(name)))

    def set_up(self, name: str) -> None:
        index = socket.if_nametoindex(name)
        self._request(_RTM_NEWLINK, 0, _ifinfo(index, _IFF_UP, _IFF_UP))

    def add_address(self, name: str, address: IPAddress, prefix: int) -> None:
        """`address`/`prefix` on link `name` (IPv6 without duplicate detection: the
        pool's addresses are unique by construction, and DAD would delay them)."""
        family, flags = _family(address), _IFA_F_NODAD if address.version == 6 else 0
        header = struct.pack("=BBBBI", family, prefix, flags, 0, socket.if_nametoindex(name))
        packed = address.packed
        self._request(
            _RTM_NEWADDR,
            _NLM_F_CREATE | _NLM_F_EXCL,
            header + _attr(_IFA_LOCAL, packed) + _attr(_IFA_ADDRESS, packed),
        )

    def add_default_route(self, name: str, gateway: IPAddress) -> None:
        # rtmsg: family, dst_len (0: default), src_len, tos, table, protocol, scope, type, flags
        header = struct.pack(
            "=BBBBBBBBI",
            *(_family(gateway), 0, 0, 0),
            *(_RT_TABLE_MAIN, _RTPROT_BOOT, 0, _RTN_UNICAST, 0),
        )
        attrs = _attr(_RTA_GATEWAY, gateway.packed)
        attrs += _attr(_RTA_OIF, struct.pack("=I", socket.if_nametoindex(name)))
        self._request(_RTM_NEWROUTE, _NLM_F_CREATE | _NLM_F_EXCL, header + attrs)

    def _request(self, kind: int, flags: int, body: bytes) -> None:
        self._seq += 1
        header = struct.pack(
            "=IHHII", 16 + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK | flags, self._seq, 0
        )
        self._sock.send(header + body)
        while True:
            reply = self._sock.recv(65536)
            offset = 0
            while offset + 16 <= len(reply):
                length, reply_kind, _, seq, _ = struct.unpack_from("=IHHII", reply, offset)
                if reply_kind == _NLMSG_ERROR and seq == self._seq:
                    error = -struct.unpack_from("=i", reply, offset + 16)[0]
                    if error:
                        raise OSError(error, os.strerror(error))
                    return
                offset += max(length + 3 & ~3, 16)


@contextmanager
def netlink() -> Iterator[Netlink]:
    link = Netlink()
    try:
        yield link
    finally:
        link.close()


def _attr(kind: int, payload: bytes) -> bytes:
    header = struct.pack("=HH", 4 + len(payload), kind)
    return header + payload + b"\0" * (-len(payload) % 4)


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, flags, change)


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def _family(address: IPAddress) -> int:
    return socket.AF_INET if address.version == 4 else socket.AF_INET6
