"""Where the server may send a job's callbacks: its defence against SSRF.

A callback is a POST from the server's own network, so a tenant's `callback_url` must not
reach what only the server can reach. By default a URL is refused when any address its
host resolves to is loopback, private (RFC 1918, fc00::/7), link-local (169.254.0.0/16
with the cloud metadata address, fe80::/10), shared (CGNAT 100.64.0.0/10), unspecified,
multicast or reserved, IPv4-mapped and other IPv6 forms of those included. The operator
allows internal receivers with `CORRAL_CALLBACK_ALLOW`: CIDRs (or single addresses) and
host names, comma-separated.

    policy = CallbackPolicy.parse(settings.callback_allow)
    target = await policy.check(url)      # CallbackRefused: says which rule
    # connect to target.addresses[0], with target.host as Host header and TLS name

The host is resolved once per check and every address must pass; the caller connects to
a checked address rather than the name, so a DNS answer that changes between the check
and the connection (rebinding) cannot point the POST somewhere else. Resolution goes
through a `Resolver`: `SystemResolver` in production, `StaticResolver` (a fake with fixed
answers, rebinding included) in tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from corral.errors import CallbackRefused, InvalidRequest
from corral.network.addresses import IPAddress, IPNetwork, denied_range, unmapped

__all__ = [
    "ALLOW_SETTING",
    "CallbackPolicy",
    "CallbackTarget",
    "Resolver",
    "StaticResolver",
    "SystemResolver",
    "destination",
]

ALLOW_SETTING = "CORRAL_CALLBACK_ALLOW"
RESOLVE_TIMEOUT = 5.0  # seconds a check waits for the resolver

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_NAME = re.compile(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]+")


class Resolver(Protocol):
    async def resolve(self, host: str) -> list[str]:
        """The addresses `host` resolves to, in the order to try them; OSError (such
        as socket.gaierror) when it does not resolve."""
        ...


class SystemResolver:
    """The host's resolver (getaddrinfo, in a thread so the event loop keeps going)."""

    async def resolve(self, host: str) -> list[str]:
        found = await asyncio.get_running_loop().getaddrinfo(
            host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        return [str(info[4][0]) for info in found]


@dataclass
class StaticResolver:
    """Answers from a table, never from the network. Each name maps to its answers, one
    per call, the last one repeating: `{"a.test": [["192.0.2.1"]]}` always gives one
    address; `[["198.51.100.7"], ["127.0.0.1"]]` is a name that rebinds after one call."""

    table: Mapping[str, Sequence[Sequence[str]]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)  # every name asked, in order

    async def resolve(self, host: str) -> list[str]:
        answers = self.table.get(host)
        calls = self.asked.count(host)
        self.asked.append(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the table")
        return list(answers[min(calls, len(answers) - 1)])


@dataclass(frozen=True)
class CallbackTarget:
    """A checked URL: connect to `addresses` (in order), naming `host` in the request."""

    url: str
    host: str  # as the URL gives it (what goes in Host and in the TLS server name)
    port: int
    addresses: tuple[IPAddress, ...]
    # Whether every address is public: what may be told to the tenant about a failure.
    public: bool

    @property
    def literal(self) -> bool:
        """Whether the URL names an address rather than a host name."""
        return _literal(self.host) is not None


def destination(url: str) -> str:
    """`host:port` of a URL: what a per-destination limit counts."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return url
    return f"{parsed.host}:{_port(parsed)}"


class CallbackPolicy:
    """Public addresses, plus what the operator allows (networks and host names).

    Also the policy of other requests the server makes for a tenant (a template build's
    registry pull): `setting` names the operator's variable and `field` what the tenant
    gave, in refusals."""

    def __init__(
        self,
        networks: Iterable[IPNetwork] = (),
        names: Iterable[str] = (),
        resolver: Resolver | None = None,
        *,
        setting: str = ALLOW_SETTING,
        field: str = "callback_url",
    ) -> None:
        self.networks = tuple(networks)
        self.names = frozenset(n.lower().rstrip(".") for n in names)
        self.resolver: Resolver = resolver or SystemResolver()
        self.setting, self.field = setting, field

    @classmethod
    def parse(
        cls,
        allow: str,
        resolver: Resolver | None = None,
        *,
        setting: str = ALLOW_SETTING,
        field: str = "callback_url",
    ) -> CallbackPolicy:
        """The policy of a `CORRAL_CALLBACK_ALLOW` value, e.g. "10.1.0.0/16, hooks.corp"."""
        networks: list[IPNetwork] = []
        names: list[str] = []
        for raw in allow.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry))
                continue
            except ValueError as exc:
                if "/" in entry or _literal(entry) is not None:
                    raise InvalidRequest(
                        f"{setting}: {entry!r} is not a network ({exc}); write a "
                        "CIDR such as 10.1.0.0/16, an address, or a host name"
                    ) from None
            if not _HOST_NAME.fullmatch(entry.rstrip(".")):
                raise InvalidRequest(
                    f"{setting}: {entry!r} is neither a CIDR, an address nor a host "
                    "name; separate entries with commas"
                )
            names.append(entry)
        return cls(networks, names, resolver, setting=setting, field=field)

    async def check(self, url: str) -> CallbackTarget:
        """Resolve the URL's host once and check every address; CallbackRefused names
        the rule it breaks (and never the address a host name resolved to)."""
        # httpx's parser, the one that sends the request: no parser differential can
        # make the host checked here differ from the one the POST goes to.
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise CallbackRefused(f"{self.field}: {exc}") from None
        host = parsed.host
        if parsed.scheme not in ("http", "https") or not host:
            raise CallbackRefused(f"{self.field}: must be an http:// or https:// URL")
        literal = _literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT):
                    answers = await self.resolver.resolve(host)
                addresses = [unmapped(ipaddress.ip_address(a)) for a in answers]
            except (OSError, ValueError) as exc:  # TimeoutError is an OSError
                raise CallbackRefused(
                    f"{self.field}: host {host!r} does not resolve from this server "
                    f"({str(exc) or 'no answer in time'})"
                ) from None
            if not addresses:
                raise CallbackRefused(f"{self.field}: host {host!r} has no address")
        addresses = list(dict.fromkeys(addresses))
        named = host.lower().rstrip(".") in self.names
        public = True
        for address in addresses:
            rule = refusal(address)
            if rule is None:
                continue
            public = False
            if named or any(address in n for n in self.networks if n.version == address.version):
                continue
            what = f"{address} is" if literal is not None else f"host {host!r} resolves to"
            raise CallbackRefused(
                f"{self.field}: {what} {rule} address, which this server does not reach "
                f"for you by default; its operator can allow it with {self.setting}"
            )
        return CallbackTarget(url, host, _port(parsed), tuple(addresses), public)


def refusal(address: IPAddress) -> str | None:
    """The rule a callback to `address` breaks, or None for a public address.

    Stricter than a sandbox's egress: beyond the always-denied table, a callback refuses
    every address that is not global (documentation ranges included) and IPv6
    transition forms (6to4, Teredo, NAT64) of a refused IPv4 address.
    """
    address = unmapped(address)
    denied = denied_range(address)
    if denied is not None:
        return denied.reason
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_reserved:
            return "a reserved"
        inner = _embedded(address)
        if inner is not None and refusal(inner) is not None:
            return "an IPv6 transition (6to4, Teredo, NAT64) of a non-public"
    elif address.is_reserved:
        return "a reserved"
    if not address.is_global:
        return "a non-global"
    return None


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _literal(host: str) -> IPAddress | None:
    """The address a URL host names, in any form a resolver would read as one: IPv6,
    dotted quad, and the legacy forms inet_aton takes (127.1, 0x7f.1, 2130706433)."""
    try:
        return unmapped(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    if not re.fullmatch(r"[0-9a-fx.]+", host.lower()):
        return None  # a name: inet_aton would also take "1.2.3.4 junk"
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _embedded(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None
