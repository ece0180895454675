"""The address ranges no sandbox and no callback reaches unless an operator names them.

One table, read by the sandbox network policy (and compiled from it into the kernel's
rules) and by the callback policy's SSRF defence, so the two never disagree about what
"private" means. The documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32) are not in it: they route nowhere real, and the tests' fake internet lives
there.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class DeniedRange:
    network: IPNetwork
    # Completes "… is a(n) ___ address".
    reason: str


def _ranges(reason: str, *cidrs: str) -> list[DeniedRange]:
    return [DeniedRange(ipaddress.ip_network(c), reason) for c in cidrs]


DENIED: tuple[DeniedRange, ...] = tuple(
    _ranges("an unspecified", "0.0.0.0/8", "::/128")
    + _ranges("a loopback", "127.0.0.0/8", "::1/128")
    + _ranges(
        "a link-local (169.254.0.0/16, fe80::/10: cloud metadata included)",
        "169.254.0.0/16",
        "fe80::/10",
    )
    + _ranges("a multicast", "224.0.0.0/4", "ff00::/8")
    + _ranges("a shared (CGNAT 100.64.0.0/10)", "100.64.0.0/10")
    + _ranges(
        "a private (RFC 1918, fc00::/7 or another non-routable range)",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fc00::/7",
    )
    + _ranges(
        "a reserved",
        "192.0.0.0/24",  # IETF protocol assignments
        "198.18.0.0/15",  # benchmarking
        "240.0.0.0/4",  # future use, and the limited broadcast address
        "fec0::/10",  # site-local, deprecated
        "100::/64",  # discard-only
    )
    + _ranges(
        # An IPv4 address in IPv6 form: the kernel sends a connect to ::ffff:a.b.c.d as
        # IPv4 (where the IPv4 ranges decide); on the wire these only smuggle.
        "an IPv4-mapped or -translated",
        "::ffff:0:0/96",
        "64:ff9b::/96",
        "64:ff9b:1::/48",
    )
)


def unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address stands for; others unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def denied_range(address: IPAddress) -> DeniedRange | None:
    """The always-denied range `address` (unmapped first) is in, or None."""
    address = unmapped(address)
    for entry in DENIED:
        if entry.network.version == address.version and address in entry.network:
            return entry
    return None
