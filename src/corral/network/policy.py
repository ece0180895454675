"""What a sandbox may reach: its network policy, as one value every tier enforces.

    NetworkPolicy.parse("none")                              # loopback only (the default)
    NetworkPolicy.parse("internet")                          # public addresses
    NetworkPolicy.parse("allowlist", ["pypi.org", "*.githubusercontent.com:443",
                                      "203.0.113.0/24", "[2001:db8::/32]:80-89"])

`decide` is the reference semantics of a policy; the kernel's rules are a compilation of
it, and the sandbox's DNS resolver asks `answer` before resolving a name. The policy
knows nothing of how it is enforced (veth, user-mode networking, a VM's tap), so every
isolation tier honours the same object.

The rules, in order:
- `none` reaches nothing outside the sandbox (its own loopback always works).
- DNS (port 53) goes only to the sandbox's own resolver, never to another server.
- A CIDR entry allows its addresses (on its ports), even in the always-denied ranges of
  `corral.network.addresses` (private, link-local, …): naming them is the only way in.
- A domain entry allows the addresses the sandbox's resolver answered for a name it
  matches, on its ports, but never an always-denied one (a name that resolves to a
  private address is DNS rebinding, not an invitation).
- Then the always-denied ranges, and the extra ones the host adds (its own addresses,
  other sandboxes), are denied.
- `internet` allows what is left; `allowlist` denies it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from corral.errors import Forbidden, InvalidRequest
from corral.network.addresses import (
    DENIED,
    DeniedRange,
    IPAddress,
    IPNetwork,
    denied_range,
    unmapped,
)

MODES = ("none", "internet", "allowlist")
# Other systems' names for the same modes (Agent/krunvm's --network none|allow_all).
ALIASES = {"allow_all": "internet", "deny_all": "none"}
DNS_PORT = 53
MAX_ENTRIES = 256

_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}")
_ENTRY_HELP = (
    "write a domain (pypi.org), a wildcard (*.example.com), an address or CIDR "
    "(203.0.113.0/24, [2001:db8::/32]), each optionally with a port or range "
    "(pypi.org:443, 203.0.113.7:8000-8100)"
)


@dataclass(frozen=True)
class Rule:
    """One allowlist entry. `text` is its normal form, the name events and errors use."""

    text: str
    kind: str  # "domain" | "wildcard" | "cidr"
    host: str = ""  # the domain, or the wildcard's suffix without "*."
    network: IPNetwork | None = None
    ports: tuple[int, int] | None = None  # inclusive; None: every port

    @classmethod
    def parse(cls, entry: str) -> Rule:
        if not isinstance(entry, str):
            raise InvalidRequest(
                f"network allowlist entry {entry!r} is not a string; {_ENTRY_HELP}"
            )
        raw = entry.strip().lower()
        target, ports = _split_port(raw, entry)
        try:
            network = ipaddress.ip_network(target.strip("[]"), strict=False)
        except ValueError:
            network = None
        if network is not None:
            text = str(network) if network.version == 4 else f"[{network}]"
            return cls(_with_ports(text, ports), "cidr", network=network, ports=ports)
        host = target.rstrip(".")
        kind = "domain"
        if host.startswith("*."):
            host, kind = host[2:], "wildcard"
        if not _HOST_NAME.fullmatch(host) or "*" in host or host.replace(".", "").isdigit():
            raise InvalidRequest(f"network allowlist entry {entry!r} is not valid: {_ENTRY_HELP}")
        text = f"*.{host}" if kind == "wildcard" else host
        return cls(_with_ports(text, ports), kind, host=host, ports=ports)

    def names(self, name: str) -> bool:
        """Whether this entry lets `name` (normalised) be resolved."""
        if self.kind == "domain":
            return name == self.host
        if self.kind == "wildcard":
            return name.endswith("." + self.host)
        return False

    def admits(self, port: int) -> bool:
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    def within(self, other: Rule) -> bool:
        """Whether everything this entry allows, `other` allows too (a domain is within
        itself and within a wildcard above it; a CIDR within a larger one; never a name
        within a CIDR or the reverse: what a name resolves to is not known in advance)."""
        if other.ports is not None and (
            self.ports is None
            or not other.ports[0] <= self.ports[0] <= self.ports[1] <= other.ports[1]
        ):
            return False
        if self.network is not None or other.network is not None:
            return (
                self.network is not None
                and other.network is not None
                and self.network.version == other.network.version
                and self.network.subnet_of(other.network)  # type: ignore[arg-type]
            )
        if other.kind == "domain":
            return self.kind == "domain" and self.host == other.host
        # `other` is a wildcard: it names every name under its suffix, not the suffix.
        same = self.host == other.host and self.kind == "wildcard"
        return same or self.host.endswith("." + other.host)

    def private(self) -> DeniedRange | None:
        """The first always-denied range a CIDR entry reaches into (naming one is how a
        sandbox gets in, so the server's operator decides), or None."""
        if self.network is None:
            return None
        for entry in DENIED:
            if entry.network.version == self.network.version and entry.network.overlaps(
                self.network
            ):
                return entry
        return None


# What answers a name in `internet` mode: every public name, on every port.
INTERNET = Rule("internet", "internet")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # the entry or rule that decided, as events report it


@dataclass(frozen=True)
class NetworkPolicy:
    mode: str = "none"
    allow: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidRequest(
                f"network mode {self.mode!r} is not known; use one of {', '.join(MODES)}"
                f" (or {', '.join(ALIASES)}, the same as {', '.join(ALIASES.values())})"
            )
        if self.mode == "none" and self.allow:
            raise InvalidRequest(
                "network mode 'none' takes no allowlist entries; use mode 'allowlist' "
                "(only the entries) or 'internet' (public addresses plus the entries)"
            )
        if len(self.allow) > MAX_ENTRIES:
            raise InvalidRequest(
                f"a network allowlist has at most {MAX_ENTRIES} entries, got "
                f"{len(self.allow)}; use wildcards or CIDRs"
            )

    @classmethod
    def parse(cls, mode: str = "none", allow: Iterable[str] = ()) -> NetworkPolicy:
        """The policy a caller wrote: a mode (or alias) and allowlist entries."""
        if not isinstance(mode, str):
            raise InvalidRequest(f"network mode must be a string, got {mode!r}")
        if isinstance(allow, str):
            raise InvalidRequest("network allowlist entries must be a list of strings")
        name = mode.strip().lower() or "none"
        rules = tuple(dict.fromkeys(Rule.parse(e) for e in allow))
        return cls(ALIASES.get(name, name), rules)

    @classmethod
    def of(cls, value: NetworkPolicy | str | None) -> NetworkPolicy:
        """A policy from a policy, a bare mode, or None (no network)."""
        if isinstance(value, NetworkPolicy):
            return value
        return cls.parse(value or "none")

    @property
    def entries(self) -> tuple[str, ...]:
        return tuple(rule.text for rule in self.allow)

    def __str__(self) -> str:
        return f"{self.mode}: {', '.join(self.entries)}" if self.allow else self.mode

    def exceeds(self, ceiling: NetworkPolicy) -> str | None:
        """What this policy asks beyond `ceiling`, or None (it is within it).

        Modes rank none < allowlist < internet. Each entry must be within one of the
        ceiling's entries, except that under an `internet` ceiling a public entry (a name,
        or a CIDR clear of the always-denied ranges) asks for nothing more."""
        if _RANK[self.mode] > _RANK[ceiling.mode]:
            return f"network mode {self.mode!r}"
        for rule in self.allow:
            if any(rule.within(limit) for limit in ceiling.allow):
                continue
            if ceiling.mode == "internet" and rule.private() is None:
                continue
            return f"network allowlist entry {rule.text!r}"
        return None

    def answer(self, name: str) -> Rule | None:
        """The rule under which the sandbox's resolver may resolve `name`, or None
        (the resolver then answers NXDOMAIN)."""
        if self.mode == "none":
            return None
        name = name.lower().rstrip(".")
        for rule in self.allow:
            if rule.names(name):
                return rule
        return INTERNET if self.mode == "internet" else None

    def decide(
        self,
        address: IPAddress | str,
        port: int,
        protocol: str,
        resolved: Sequence[Rule] = (),
        also_denied: Iterable[IPNetwork] = (),
    ) -> Decision:
        """Whether a new connection (or UDP flow) from the sandbox to `address`:`port`
        is allowed. `resolved` are the rules whose names the sandbox's resolver answered
        with this address; `also_denied` the host's own and other sandboxes' networks."""
        if self.mode == "none":
            return Decision(False, "none")
        address = unmapped(ipaddress.ip_address(address))
        if protocol not in ("tcp", "udp"):
            return Decision(False, "only TCP and UDP")
        if port == DNS_PORT:
            return Decision(False, "dns: only the sandbox's resolver")
        for rule in self.allow:
            if rule.network is not None and address in rule.network and rule.admits(port):
                return Decision(True, rule.text)
        always = denied_range(address)
        if always is not None:
            return Decision(False, always.reason)
        for network in also_denied:
            if network.version == address.version and address in network:
                return Decision(False, "a host or another sandbox")
        for rule in resolved:
            if rule.admits(port):
                return Decision(True, rule.text)
        if self.mode == "internet":
            return Decision(True, INTERNET.text)
        return Decision(False, "not on the allowlist")


_RANK = {"none": 0, "allowlist": 1, "internet": 2}
_OPERATOR = "ask the server's operator"


@dataclass(frozen=True)
class NetworkCap:
    """What a server lets its teams ask for: its operator's settings, checked when a
    sandbox is created, its policy changed, or a job submitted.

    `none` is always allowed. `internet_teams` None means every team. An allowlist entry
    must fall within one of `allow_cap` (empty: any entry). A CIDR entry that reaches into
    an always-denied range (private, link-local, …) must fall within `private_allow`:
    naming such a range is the only way a sandbox gets into it, so the operator decides.
    """

    modes: frozenset[str] = frozenset(MODES)
    internet_teams: frozenset[str] | None = None
    allow_cap: tuple[Rule, ...] = ()
    private_allow: tuple[Rule, ...] = ()

    @classmethod
    def parse(
        cls,
        modes: str = "",
        internet_teams: str = "*",
        allow_cap: str = "",
        private_allow: str = "",
    ) -> NetworkCap:
        """The cap from the settings' comma-separated texts (CORRAL_NETWORK_*)."""
        chosen = set()
        for name in _items(modes) or MODES:
            mode = ALIASES.get(name.lower(), name.lower())
            if mode not in MODES:
                raise InvalidRequest(
                    f"CORRAL_NETWORK_MODES has {name!r}; use a comma list of {', '.join(MODES)}"
                )
            chosen.add(mode)
        teams = _items(internet_teams)
        return cls(
            frozenset(chosen | {"none"}),
            None if "*" in teams else frozenset(teams),
            _rules("CORRAL_NETWORK_ALLOW_CAP", allow_cap),
            _rules("CORRAL_NETWORK_PRIVATE_ALLOW", private_allow, cidrs=True),
        )

    def check(self, policy: NetworkPolicy, team: str) -> None:
        """Refuse (Forbidden) a policy this server does not let `team` have, saying why
        and whom to ask."""
        if policy.mode not in self.modes:
            raise Forbidden(
                f"this server does not allow network mode {policy.mode!r} (it allows "
                f"{', '.join(m for m in MODES if m in self.modes)}); {_OPERATOR} "
                "(CORRAL_NETWORK_MODES)"
            )
        if policy.mode == "internet" and not (
            self.internet_teams is None or team in self.internet_teams
        ):
            raise Forbidden(
                f"team {team!r} may not use network mode 'internet' on this server; use "
                f"'allowlist' with the destinations you need, or {_OPERATOR} to add the "
                "team to CORRAL_NETWORK_INTERNET_TEAMS"
            )
        for rule in policy.allow:
            private = rule.private()
            if private is not None and not any(rule.within(p) for p in self.private_allow):
                raise Forbidden(
                    f"network allowlist entry {rule.text!r} reaches into {private.network}, "
                    f"{private.reason} range; sandboxes "
                    f"reach those only where the server's operator allows them: name a "
                    f"public range, or {_OPERATOR} (CORRAL_NETWORK_PRIVATE_ALLOW)"
                )
            if self.allow_cap and not any(rule.within(c) for c in self.allow_cap):
                raise Forbidden(
                    f"network allowlist entry {rule.text!r} is outside what this server "
                    f"lets an allowlist name ({', '.join(c.text for c in self.allow_cap)}); "
                    f"{_OPERATOR} (CORRAL_NETWORK_ALLOW_CAP)"
                )


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _rules(setting: str, text: str, *, cidrs: bool = False) -> tuple[Rule, ...]:
    rules = []
    for item in _items(text):
        try:
            rule = Rule.parse(item)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{setting}: {exc}") from None
        if cidrs and rule.network is None:
            raise InvalidRequest(
                f"{setting} has {item!r}; write address ranges (10.0.0.0/8, fd00::/8)"
            )
        rules.append(rule)
    return tuple(rules)


def _split_port(raw: str, entry: str) -> tuple[str, tuple[int, int] | None]:
    """(target, ports) of an entry: `host:443`, `[v6]:80-89`; a bare IPv6 has no port."""
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise InvalidRequest(f"network allowlist entry {entry!r} has no closing ']'")
        target, rest = raw[: close + 1], raw[close + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidRequest(f"network allowlist entry {entry!r}: {_ENTRY_HELP}")
        return target, _ports(rest[1:], entry) if rest else None
    if raw.count(":") == 1:
        target, text = raw.split(":")
        return target, _ports(text, entry)
    return raw, None


def _ports(text: str, entry: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        ports = (int(low), int(high or low))
    except ValueError:
        ports = (0, 0)
    if not (1 <= ports[0] <= ports[1] <= 65535):
        raise InvalidRequest(
            f"network allowlist entry {entry!r}: the port must be 1-65535 or a range "
            "such as 8000-8100"
        )
    return ports


def _with_ports(text: str, ports: tuple[int, int] | None) -> str:
    if ports is None:
        return text
    return f"{text}:{ports[0]}" if ports[0] == ports[1] else f"{text}:{ports[0]}-{ports[1]}"
