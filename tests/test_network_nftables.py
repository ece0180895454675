"""The nftables ruleset of a sandbox's network policy (corral.network.nftables), as text:
the deny maps are the always-denied table, every decision has its labelled chain, and the
kernel's own parser accepts every mode's script (`nft -c`, which loads nothing)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from corral.limits import Limits
from corral.network import nftables
from corral.network.addresses import DENIED
from corral.network.policy import NetworkPolicy

POLICIES = [
    NetworkPolicy.parse("none"),
    NetworkPolicy.parse("internet"),
    NetworkPolicy.parse("internet", ["10.99.0.0/24:80"]),
    NetworkPolicy.parse(
        "allowlist",
        ["allowed.test:80", "*.allowed.test", "203.0.113.0/24", "[2001:db8::/32]:80-89"],
    ),
]


def map_elements(script: str, name: str) -> dict[str, str]:
    """The elements of map `name` in `script`: network -> the chain it jumps to."""
    block = re.search(rf"map {name} \{{.*?elements = \{{ (.*?) \}}", script, re.S)
    assert block is not None, f"no elements in map {name}"
    pairs = (item.split(" : jump ") for item in block.group(1).split(", "))
    return {network: chain for network, chain in pairs}


def test_the_deny_maps_are_the_always_denied_table() -> None:
    script = nftables.render(POLICIES[1], resolver="127.0.0.53")
    rendered = {ipaddress.ip_network(n) for v in (4, 6) for n in map_elements(script, f"deny{v}")}
    assert rendered == {entry.network for entry in DENIED}


def test_each_denied_range_jumps_to_the_chain_of_its_reason() -> None:
    policy = POLICIES[3]
    script = nftables.render(policy, resolver="127.0.0.53")
    labels = nftables.labels(policy)
    for entry in DENIED:
        elements = map_elements(script, f"deny{entry.network.version}")
        chain = elements[str(entry.network)]
        label = labels[int(chain[1:])]
        assert label == nftables.Label(False, entry.reason)
        # The chain logs with the prefix the event reader maps back to this label.
        assert f'prefix "corral denied {chain[1:]}"' in script


def test_host_networks_are_added_only_where_no_range_denies_them_already() -> None:
    also = [
        ipaddress.ip_network("10.213.0.0/16"),  # inside 10/8: already denied
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("192.0.0.0/22"),  # overlaps 192.0.0.0/24: only the rest
        ipaddress.ip_network("2001:db8::1/128"),
    ]
    elements = nftables.deny_elements(also)
    extra = {str(n) for v in (4, 6) for n, why in elements[v] if why == nftables.ALSO_DENIED}
    assert extra == {"192.0.1.0/24", "192.0.2.0/23", "2001:db8::1/128"}


def test_cidr_entries_come_before_the_deny_maps_and_keep_their_ports() -> None:
    script = nftables.render(POLICIES[3], resolver="127.0.0.53")
    decide = script[script.index("chain decide") :]
    assert decide.index("ip daddr 203.0.113.0/24 jump") < decide.index("vmap @deny4")
    assert "ip6 daddr 2001:db8::/32 th dport 80-89 jump" in decide
    assert decide.index("ct state established,related accept") < decide.index("ct count")
    # allowlist ends refusing; internet ends accepting
    assert nftables.labels(POLICIES[3])[int(_last_jump(decide))].rule == nftables.NOT_LISTED
    internet = nftables.render(POLICIES[1], resolver="127.0.0.53")
    decide = internet[internet.index("chain decide") :]
    assert nftables.labels(POLICIES[1])[int(_last_jump(decide))].rule == "internet"


def _last_jump(decide: str) -> str:
    body = decide[: decide.index("\n  }")]
    return str(re.findall(r"jump l(\d+)", body)[-1])


def test_resolved_addresses_are_added_with_their_rule_ports_and_a_timeout() -> None:
    policy = POLICIES[3]
    rule = policy.allow[0]  # allowed.test:80
    lines = nftables.allow_elements(rule, ["192.0.2.10", "2001:db8::10"], 5, policy)
    chain = nftables.labels(policy).index(nftables.Label(True, "allowed.test:80"))
    assert lines.splitlines() == [
        f"add element inet corral allow4 {{ 192.0.2.10 . tcp . 80 timeout 60s : jump l{chain},"
        f" 192.0.2.10 . udp . 80 timeout 60s : jump l{chain} }}",
        f"add element inet corral allow6 {{ 2001:db8::10 . tcp . 80 timeout 60s : jump l{chain},"
        f" 2001:db8::10 . udp . 80 timeout 60s : jump l{chain} }}",
    ]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root and nftables"
)
@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_the_kernel_parser_accepts_every_mode(policy: NetworkPolicy) -> None:
    script = nftables.render(
        policy,
        resolver="127.0.0.53",
        also_denied=[ipaddress.ip_network("192.0.2.1/32")],
        limits=Limits(connections=8, bandwidth_mbit=16),
        log_group=3,
        police=True,  # the rootless bandwidth cap's chains parse too
    )
    assert "limit rate over 2000 kbytes/second" in script
    for rule in policy.allow:
        if rule.network is None:
            script += nftables.allow_elements(rule, ["192.0.2.10", "2001:db8::10"], 30, policy)
    done = subprocess.run(["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_log_prefix_names_the_rule_that_decided() -> None:
    policy = POLICIES[3]
    found = nftables.labels(policy)
    n = found.index(nftables.Label(True, "203.0.113.0/24"))
    event = nftables.event(f"corral allowed {n}", "tcp", "203.0.113.7", 443, found)
    assert event is not None
    assert (event.kind, event.decision, event.rule, event.address, event.port) == (
        "connect",
        "allowed",
        "203.0.113.0/24",
        "203.0.113.7",
        443,
    )
    # Not ours, out of range, or a decision the label does not have: no event.
    for prefix in ("other 1", f"corral denied {n}", f"corral allowed {len(found)}", "corral x"):
        assert nftables.event(prefix, "tcp", "203.0.113.7", 443, found) is None
