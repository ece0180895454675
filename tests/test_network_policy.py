"""The network policy's reference semantics (pure: no namespace, no packet)."""

from __future__ import annotations

import ipaddress

import pytest

from corral.errors import InvalidRequest
from corral.network.addresses import DENIED, denied_range
from corral.network.events import NetworkEvent, NetworkEventLog
from corral.network.policy import INTERNET, NetworkPolicy, Rule


def test_entries_parse_to_their_normal_form() -> None:
    cases = {
        "PyPI.org": ("pypi.org", "domain", None),
        "pypi.org.": ("pypi.org", "domain", None),
        "*.githubusercontent.com:443": ("*.githubusercontent.com:443", "wildcard", (443, 443)),
        "203.0.113.0/24": ("203.0.113.0/24", "cidr", None),
        "203.0.113.7:8000-8100": ("203.0.113.7/32:8000-8100", "cidr", (8000, 8100)),
        "2001:db8::/32": ("[2001:db8::/32]", "cidr", None),
        "[2001:db8::1]:80": ("[2001:db8::1/128]:80", "cidr", (80, 80)),
    }
    for entry, (text, kind, ports) in cases.items():
        rule = Rule.parse(entry)
        assert (rule.text, rule.kind, rule.ports) == (text, kind, ports), entry


@pytest.mark.parametrize(
    "entry",
    ["", "*", "*.", "a..b", "pypi.org:0", "pypi.org:70000", "pypi.org:9-1", "[2001:db8::1",
     "x.*.example.com", "exa mple.com", "10.0.0.0/33", "pypi.org:https", "1.2.3"],
)  # fmt: skip
def test_bad_entries_are_refused_saying_what_is_accepted(entry: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        NetworkPolicy.parse("allowlist", [entry])
    assert repr(entry) in str(caught.value) or "port" in str(caught.value)


def test_modes_aliases_and_mistakes() -> None:
    assert NetworkPolicy.parse("allow_all") == NetworkPolicy("internet")
    assert NetworkPolicy.of(None) == NetworkPolicy.of("") == NetworkPolicy()
    assert str(NetworkPolicy.parse("allowlist", ["a.test", "a.test"])) == "allowlist: a.test"
    with pytest.raises(InvalidRequest, match="use one of none, internet, allowlist"):
        NetworkPolicy.parse("open")
    with pytest.raises(InvalidRequest, match="takes no allowlist entries"):
        NetworkPolicy.parse("none", ["a.test"])
    with pytest.raises(InvalidRequest, match="list of strings"):
        NetworkPolicy.parse("allowlist", "a.test")


def test_the_resolver_answers_only_named_names() -> None:
    policy = NetworkPolicy.parse("allowlist", ["allowed.test", "*.cdn.test:443"])
    assert policy.answer("ALLOWED.test.") == Rule.parse("allowed.test")
    assert policy.answer("a.b.cdn.test") == Rule.parse("*.cdn.test:443")
    assert policy.answer("cdn.test") is None  # a wildcard names subdomains only
    assert policy.answer("denied.test") is None
    assert NetworkPolicy.parse("internet").answer("anything.test") is INTERNET
    assert NetworkPolicy().answer("allowed.test") is None


def test_decisions() -> None:
    none = NetworkPolicy()
    internet = NetworkPolicy.parse("internet", ["10.99.0.0/16:80"])
    allowlist = NetworkPolicy.parse("allowlist", ["allowed.test:80", "203.0.113.0/24"])
    named = [Rule.parse("allowed.test:80")]
    cases = [
        (none, "192.0.2.10", 80, "tcp", (), False, "none"),
        (internet, "192.0.2.10", 80, "tcp", (), True, "internet"),
        (internet, "2001:db8::10", 443, "udp", (), True, "internet"),
        (internet, "169.254.169.254", 80, "tcp", (), False, "link-local"),
        (internet, "::ffff:169.254.169.254", 80, "tcp", (), False, "link-local"),
        (internet, "fd00::1", 80, "tcp", (), False, "private"),
        (internet, "100.64.1.1", 80, "tcp", (), False, "CGNAT"),
        (internet, "10.99.0.10", 80, "tcp", (), True, "10.99.0.0/16:80"),  # named explicitly
        (internet, "10.99.0.10", 81, "tcp", (), False, "private"),
        (internet, "192.0.2.53", 53, "udp", (), False, "resolver"),  # DNS only via ours
        (internet, "192.0.2.10", 80, "icmp", (), False, "TCP and UDP"),
        (allowlist, "192.0.2.10", 80, "tcp", named, True, "allowed.test:80"),
        (allowlist, "192.0.2.10", 443, "tcp", named, False, "not on the allowlist"),
        (allowlist, "192.0.2.10", 80, "tcp", (), False, "not on the allowlist"),
        (allowlist, "10.99.0.10", 80, "tcp", named, False, "private"),  # rebinding
        (allowlist, "203.0.113.9", 8080, "udp", (), True, "203.0.113.0/24"),
    ]
    for policy, address, port, proto, resolved, allowed, rule in cases:
        decision = policy.decide(address, port, proto, resolved)
        assert decision.allowed is allowed, (policy, address, port)
        assert rule in decision.rule, (policy, address, port, decision)
    host = [ipaddress.ip_network("198.51.100.0/24")]
    assert not internet.decide("198.51.100.1", 80, "tcp", also_denied=host).allowed


def test_the_denied_table_covers_what_the_issue_names() -> None:
    internal = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254",
                "127.0.0.1", "224.0.0.1", "fc00::1", "fe80::1", "ff02::1", "::1", "::"]  # fmt: skip
    for address in internal:
        assert denied_range(ipaddress.ip_address(address)) is not None, address
    for address in ["192.0.2.10", "198.51.100.10", "203.0.113.53", "2001:db8::10", "8.8.8.8"]:
        assert denied_range(ipaddress.ip_address(address)) is None, address
    documentation = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32"]
    for cidr in map(ipaddress.ip_network, documentation):  # the fake internet lives there
        assert not any(e.network.version == cidr.version and e.network.overlaps(cidr)
                       for e in DENIED)  # fmt: skip


def test_a_flood_is_rate_limited_and_counted_exactly() -> None:
    log = NetworkEventLog(rate=0.0, burst=10)
    for i in range(100_000):
        log.add(NetworkEvent("connect", "denied", "not on the allowlist", "tcp", "192.0.2.1", i))
    log.add(NetworkEvent("dns", "denied", "not on the allowlist", name="x.test"))
    batch = log.take()
    kept = [e for e in batch if e.kind != "suppressed"]
    suppressed = {(e.name, e.rule): e.count for e in batch if e.kind == "suppressed"}
    assert len(kept) == 10
    assert suppressed == {("connect", "not on the allowlist"): 99_990,
                          ("dns", "not on the allowlist"): 1}  # fmt: skip
    assert log.take() == []
