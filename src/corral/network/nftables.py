"""A sandbox's network policy compiled to one nftables script, for its own network namespace.

`render` returns a complete `nft -f` script for the table `inet corral`: loading it
replaces the whole table in one transaction, so a policy change never leaves a moment
with half a ruleset. The rules are a compilation of `NetworkPolicy.decide` and keep its
order:

1. `ct state established,related accept` first: a policy change hits new connections
   only; then the connection cap (`Limits.connections`, `ct count`).
2. Anything but TCP and UDP is refused; so is port 53 (DNS goes to the sandbox's own
   resolver on its loopback, which is accepted before any of this).
3. The allowlist's CIDR entries (with their ports), then the always-denied ranges of
   `corral.network.addresses` and the host's `also_denied` networks (maps `deny4`/`deny6`),
   then the addresses the resolver answered for an allowed name (maps `allow4`/`allow6`,
   `address . protocol . port-range` with a timeout, filled by `allow_elements`), then
   `internet` accepts and `allowlist` refuses what is left.

Every decision jumps to a chain of its own, one per *label* (the rule that decided, as
`labels` lists them): a rate-limited `log` rule with the prefix `corral <allowed|denied>
<n>` (n indexes `labels`), then a named counter and the verdict in the rules after it —
`limit … log … drop` in one rule would let the packets over the limit fall through to the
next rule. The counters are exact however many log lines the limit held back. TCP is
refused with a reset and UDP with an ICMP error, so clients fail at once, not by timeout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.limits import Limits
from corral.network.addresses import DENIED, IPNetwork
from corral.network.events import NetworkEvent
from corral.network.policy import INTERNET, NetworkPolicy, Rule

TABLE = "corral"
# Log lines per label per second, and the burst: the kernel's share of the rate limit.
LOG_RATE, LOG_BURST = 20, 50
# Timeout of an element the resolver adds: an answer's TTL, but at least this.
MIN_TTL = 60.0

ALSO_DENIED = "a host or another sandbox"
PROTOCOL = "only TCP and UDP"
DNS = "dns: only the sandbox's resolver"
CONNECTIONS = "too many connections (Limits.connections)"
NOT_LISTED = "not on the allowlist"
NONE = "none"
# A microVM guest's tap in the sandbox's namespace (`corral.isolation.microvm_net`): its
# DNS queries come in there, redirected to the resolver. Code in the sandbox cannot make
# a link of that name (it holds no capability over the namespace).
GUEST_LINK = "corral-vm"


@dataclass(frozen=True)
class Label:
    """The rule that decided, as events report it; its index names its chain."""

    allowed: bool
    rule: str

    @property
    def decision(self) -> str:
        return "allowed" if self.allowed else "denied"


def labels(policy: NetworkPolicy) -> list[Label]:
    """Every rule the ruleset of `policy` can decide by, in a fixed order: `corral
    <decision> <n>` log prefixes index this list."""
    found = [
        Label(False, NONE),
        Label(False, CONNECTIONS),
        Label(False, PROTOCOL),
        Label(False, DNS),
        *(Label(True, rule.text) for rule in policy.allow),
        *dict.fromkeys(Label(False, entry.reason) for entry in DENIED),
        Label(False, ALSO_DENIED),
        Label(True, INTERNET.text),
        Label(False, NOT_LISTED),
    ]
    return found


def event(
    prefix: str, protocol: str, address: str, port: int, found: Sequence[Label]
) -> NetworkEvent | None:
    """The connection event a kernel log line with `prefix` stands for, given the labels
    of the ruleset that logged it; None for a prefix that is not one of ours."""
    words = prefix.split()
    if len(words) != 3 or words[0] != "corral" or not words[2].isdigit():
        return None
    n = int(words[2])
    if n >= len(found) or found[n].decision != words[1]:
        return None
    return NetworkEvent("connect", found[n].decision, found[n].rule, protocol, address, port)


def render(
    policy: NetworkPolicy,
    *,
    resolver: str,
    also_denied: Iterable[IPNetwork] = (),
    limits: Limits | None = None,
    log_group: int = 0,
    fresh: bool = False,
    police: bool = False,
) -> str:
    """The `nft -f` script that makes table `inet corral` enforce `policy` (see the
    module docstring). `resolver` is the sandbox's DNS resolver, on its loopback;
    `also_denied` the host's networks (the sandbox pool); `log_group` the NFLOG group.
    `fresh`: for a namespace that has no such table yet; the script then only creates
    it (deleting even an empty table costs the kernel a grace period, ~10 ms).
    `police`: enforce `limits.bandwidth_mbit` here, dropping what goes over it each way,
    where no uplink of the host's can be shaped (slirp4netns: tc in a user namespace can
    queue what leaves but cannot load the modules that limit what comes in)."""
    limits = limits or Limits()
    found = labels(policy)
    index = {label: n for n, label in enumerate(found)}

    def jump(allowed: bool, rule: str) -> str:
        return f"jump l{index[Label(allowed, rule)]}"

    # Create the table if it is missing, so that deleting it never fails: then the whole
    # new table, all in the one transaction `nft -f` makes of a script.
    lines = [] if fresh else [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}"]
    lines.append(f"table inet {TABLE} {{")
    deny = deny_elements(also_denied)
    for version, family in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        elements = ", ".join(f"{net} : {jump(False, why)}" for net, why in deny[version])
        lines += [
            f"  map deny{version} {{",
            f"    type {family} : verdict",
            "    flags interval",
            f"    elements = {{ {elements} }}",
            "  }",
            f"  map allow{version} {{",
            f"    type {family} . inet_proto . inet_service : verdict",
            "    flags interval, timeout",
            "  }",
        ]
    for n, label in enumerate(found):
        verdict = (
            ["accept"]
            if label.allowed
            else ["meta l4proto tcp reject with tcp reset", "reject with icmpx admin-prohibited"]
        )
        lines += [
            f"  counter l{n} {{}}",
            f"  chain l{n} {{",
            f"    limit rate {LOG_RATE}/second burst {LOG_BURST} packets"
            f' log group {log_group} prefix "corral {label.decision} {n}"',
            f'    counter name "l{n}"',
            *(f"    {v}" for v in verdict),
            "  }",
        ]
    lines += [
        "  chain decide {",
        "    ct state established,related accept",
        f"    ct state new ct count over {limits.connections} {jump(False, CONNECTIONS)}",
    ]
    if policy.mode == "none":
        lines.append(f"    {jump(False, NONE)}")
    else:
        lines += [
            f"    meta l4proto != {{ tcp, udp }} {jump(False, PROTOCOL)}",
            f"    th dport 53 {jump(False, DNS)}",
            *(
                f"    {_match_cidr(rule)} {jump(True, rule.text)}"
                for rule in policy.allow
                if rule.network is not None
            ),
            "    ip daddr vmap @deny4",
            "    ip6 daddr vmap @deny6",
            "    ip daddr . meta l4proto . th dport vmap @allow4",
            "    ip6 daddr . meta l4proto . th dport vmap @allow6",
            f"    {jump(True, INTERNET.text)}"
            if policy.mode == "internet"
            else f"    {jump(False, NOT_LISTED)}",
        ]
    lines += [
        "  }",
        "  chain output {",
        "    type filter hook output priority 0; policy drop;",
        # The sandbox's own loopback: where its resolver listens ({resolver}) and where
        # the host's port proxy connects; nothing on it leaves the namespace.
        f'    oifname "lo" accept comment "the resolver: {resolver}"',
        # IPv6 finds its neighbours (the uplink's host end) with these; not traffic.
        "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
        # The kernel's own multicast listener reports: no decision of the sandbox's.
        "    icmpv6 type { mld-listener-report, mld-listener-done, mld2-listener-report } drop",
        "    jump decide",
        "  }",
        # What a gVisor or microVM guest sends through a tap in this namespace: the same.
        "  chain forward {",
        "    type filter hook forward priority 0; policy drop;",
        "    jump decide",
        "  }",
        # Nothing from outside opens a connection into the sandbox: replies only (the
        # port proxy comes in through the loopback, from inside).
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        "    ct state established,related accept",
        '    iifname "lo" accept',
        f'    iifname "{GUEST_LINK}" ip daddr {resolver} meta l4proto {{ tcp, udp }} th dport 53'
        " accept",
        "    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept",
        "  }",
    ]
    if police and limits.bandwidth_mbit:
        rate = limits.bandwidth_mbit * 125  # kbytes/second
        burst = max(rate // 50, 64)  # ~20 ms of traffic, at least a few full packets
        over = f"limit rate over {rate} kbytes/second burst {burst} kbytes drop"
        for chain, hook, device in (
            ("police_out", "output", "oifname"),
            ("police_in", "input", "iifname"),
        ):
            lines += [
                f"  chain {chain} {{",
                f"    type filter hook {hook} priority -10; policy accept;",
                f'    {device} "lo" accept',
                f"    {over}",
                "  }",
            ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def deny_elements(also_denied: Iterable[IPNetwork] = ()) -> dict[int, list[tuple[IPNetwork, str]]]:
    """The elements of the maps `deny4` and `deny6`: each always-denied range with its
    reason, and the parts of `also_denied` outside them (interval maps take no overlaps)."""
    elements: dict[int, list[tuple[IPNetwork, str]]] = {4: [], 6: []}
    for entry in DENIED:
        elements[entry.network.version].append((entry.network, entry.reason))
    extras = list(also_denied)
    v4 = [n for n in extras if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in extras if isinstance(n, ipaddress.IPv6Network)]
    collapsed: list[IPNetwork] = [*ipaddress.collapse_addresses(v4)]
    collapsed += ipaddress.collapse_addresses(v6)
    for extra in collapsed:
        elements[extra.version] += [(net, ALSO_DENIED) for net in _outside(extra)]
    return elements


def allow_elements(rule: Rule, addresses: Sequence[str], ttl: float, policy: NetworkPolicy) -> str:
    """`nft -f` lines adding `addresses` (the resolver's answer for a name `rule` allows)
    to the allow maps, for `rule`'s ports, for `max(ttl, MIN_TTL)` seconds."""
    index = {label: n for n, label in enumerate(labels(policy))}
    chain = f"l{index[Label(True, rule.text)]}"
    low, high = rule.ports or (1, 65535)
    ports = str(low) if low == high else f"{low}-{high}"
    seconds = max(int(ttl), int(MIN_TTL))
    lines = []
    for address in addresses:
        version = ipaddress.ip_address(address).version
        elements = ", ".join(
            f"{address} . {proto} . {ports} timeout {seconds}s : jump {chain}"
            for proto in ("tcp", "udp")
        )
        lines.append(f"add element inet {TABLE} allow{version} {{ {elements} }}")
    return "\n".join(lines) + "\n"


def _match_cidr(rule: Rule) -> str:
    assert rule.network is not None
    family = "ip" if rule.network.version == 4 else "ip6"
    match = f"{family} daddr {rule.network}"
    if rule.ports is not None:
        low, high = rule.ports
        match += f" th dport {low}" if low == high else f" th dport {low}-{high}"
    return match


def _outside(network: IPNetwork) -> list[IPNetwork]:
    """The parts of `network` in no always-denied range."""
    parts = [network]
    for entry in DENIED:
        denied: Any = entry.network  # of `network`'s version, checked first
        if denied.version != network.version:
            continue
        kept: list[IPNetwork] = []
        for part in parts:
            if not part.overlaps(denied):
                kept.append(part)
            elif not denied.supernet_of(part):
                kept += part.address_exclude(denied)
        parts = kept
    return sorted(parts, key=lambda n: (n.network_address, n.prefixlen))
