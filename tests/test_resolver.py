"""The sandbox's DNS resolver (corral.network.resolver), against the fake internet.

The layout is production's: the resolver's event loop runs in a thread inside the fake
internet's gateway namespace (the host, which reaches the fake DNS at 203.0.113.53), and
its sockets listen at 127.0.0.53:53 inside a client namespace (the sandbox's), where the
tests' queries come from. The fake DNS server's own log proves what went upstream.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import select
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from corral.errors import InvalidRequest
from corral.network.events import NetworkEvent, NetworkEventLog
from corral.network.policy import NetworkPolicy, Rule
from corral.network.resolver import (
    ADDRESS,
    SandboxResolver,
    filter_answer,
    host_nameservers,
    parse_upstream,
)
from corral.network.setns import call_in_netns, enter_netns
from tests.kit import internet as fake
from tests.kit.internet import Internet
from tests.kit.polling import wait_until

T = TypeVar("T")
UPSTREAM = [fake.DNS_V4]


class Host:
    """An event loop in a thread inside the gateway namespace: the host, as the resolver
    of a sandbox sees it."""

    def __init__(self, netns_path: str) -> None:
        self.loop = asyncio.new_event_loop()
        entered = threading.Event()

        def run() -> None:
            enter_netns(netns_path)
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(entered.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="test-host-loop", daemon=True)
        self.thread.start()
        assert entered.wait(30), "the host's event loop did not start"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], T]) -> T:
        async def call() -> T:
            return function()

        return self.run(call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def host(internet: Internet) -> Iterator[Host]:
    host = Host(f"/run/netns/{internet.netns(fake.GATEWAY)}")
    yield host
    host.close()


@pytest.fixture(scope="module")
def sandbox_netns(internet: Internet) -> str:
    """The path of the namespace the resolver serves (a sandbox's, in production)."""
    return f"/run/netns/{internet.attach('dns').netns}"


@dataclass
class Running:
    """A started resolver, what it allowed and recorded, and a client in its namespace."""

    host: Host
    netns: str
    resolver: SandboxResolver
    events: NetworkEventLog
    allowed: list[tuple[str, list[str], float]] = field(default_factory=list)
    # While set, `allow` waits for it: the reply must wait too.
    hold: asyncio.Event | None = None

    def socket(self, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket made in the resolver's namespace (usable from this thread)."""
        return call_in_netns(self.netns, lambda: socket.socket(socket.AF_INET, kind))

    def ask(self, name: str, rdtype: str = "A", *, tcp: bool = False) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        if tcp:
            with self.socket(socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect((ADDRESS, 53))
                return dns.query.tcp(query, ADDRESS, timeout=10, sock=sock)
        with self.socket() as sock:
            return dns.query.udp(query, ADDRESS, timeout=10, sock=sock)

    def take_events(self) -> list[NetworkEvent]:
        return self.host.call(self.events.take)


@pytest.fixture
def start(host: Host, sandbox_netns: str) -> Iterator[Callable[..., Running]]:
    """Start a resolver in the sandbox's namespace (closed after the test)."""
    started: list[Running] = []

    def start(policy: NetworkPolicy, upstream: list[str] = UPSTREAM, **options: Any) -> Running:
        async def make() -> Running:
            events = NetworkEventLog()
            running: Running

            async def allow(rule: Rule, addresses: list[str], ttl: float) -> None:
                running.allowed.append((rule.text, addresses, ttl))
                if running.hold is not None:
                    await running.hold.wait()

            resolver = SandboxResolver(policy, upstream, events, allow, **options)
            running = Running(host, sandbox_netns, resolver, events)
            await resolver.start(sandbox_netns)
            return running

        running = host.run(make())
        started.append(running)
        return running

    yield start
    for running in started:
        host.run(running.resolver.close())


def addresses(reply: dns.message.Message) -> list[str]:
    return [
        rdata.address
        for rrset in reply.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for rdata in rrset
    ]


def asked_upstream(internet: Internet, name: str) -> list[dict[str, Any]]:
    """The queries for `name` the fake DNS saw from the host (the gateway)."""
    return [
        seen
        for seen in internet.saw(service="dns")
        if seen["question"].startswith(f"{name}. ") and seen["client"] in fake.GATEWAY_ADDRESSES
    ]


def unique(suffix: str) -> str:
    return f"q{secrets.token_hex(4)}.{suffix}"


# -- allowed, denied, rebinding --------------------------------------------------------------


def test_an_allowed_name_is_answered_only_after_its_addresses_are_allowed(
    internet: Internet, start: Callable[..., Running]
) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    running.hold = running.host.call(asyncio.Event)
    with running.socket() as sock:
        query = dns.message.make_query("allowed.test", "A")
        sock.sendto(query.to_wire(), (ADDRESS, 53))
        wait_until(lambda: running.allowed, "the resolver to allow the answer's addresses")
        # `allow` has not returned: no reply may have left (it would be here by now).
        assert select.select([sock], [], [], 0.5)[0] == [], "replied before allowing"
        running.host.call(running.hold.set)
        sock.settimeout(10)
        reply = dns.message.from_wire(sock.recv(4096))
    assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == [fake.ALLOWED_V4]
    assert running.allowed == [("allowed.test", [fake.ALLOWED_V4], 60.0)]
    [event] = running.take_events()
    assert (event.kind, event.decision, event.rule, event.name, event.answers) == (
        "dns", "allowed", "allowed.test", "allowed.test", (fake.ALLOWED_V4,)
    )  # fmt: skip
    assert event.protocol == "udp"
    # Asked upstream from the host's namespace, not from the sandbox's.
    assert asked_upstream(internet, "allowed.test")


def test_the_aaaa_of_an_allowed_name(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    reply = running.ask("allowed.test", "AAAA")
    assert addresses(reply) == [fake.ALLOWED_V6]
    assert running.allowed == [("allowed.test", [fake.ALLOWED_V6], 60.0)]


def test_a_wildcard_entry_answers_its_subdomains_only(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["*.allowed.test:443"]))
    assert addresses(running.ask("www.allowed.test")) == [fake.ALLOWED_V4]
    assert addresses(running.ask("a.b.allowed.test", "AAAA")) == [fake.ALLOWED_V6]
    assert running.ask("allowed.test").rcode() == dns.rcode.NXDOMAIN
    assert [rule for rule, _, _ in running.allowed] == ["*.allowed.test:443"] * 2


def test_a_name_off_the_list_is_nxdomain_and_never_asked_upstream(
    internet: Internet, start: Callable[..., Running]
) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    name = unique("denied.test")
    for tcp in (False, True):
        reply = running.ask(name, tcp=tcp)
        assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    assert running.ask("denied.test", "AAAA").rcode() == dns.rcode.NXDOMAIN
    assert running.allowed == []
    events = running.take_events()
    assert [(e.decision, e.rule, e.name, e.protocol) for e in events] == [
        ("denied", "not on the allowlist", name, "udp"),
        ("denied", "not on the allowlist", name, "tcp"),
        ("denied", "not on the allowlist", "denied.test", "udp"),
    ]
    # The proof that it never left: an allowed name asked after it did reach upstream.
    wildcard = NetworkPolicy.parse("allowlist", ["*.allowed.test"])
    running.host.call(lambda: running.resolver.set_policy(wildcard))
    allowed = unique("allowed.test")
    running.ask(allowed)
    wait_until(lambda: asked_upstream(internet, allowed), "the allowed query upstream")
    assert asked_upstream(internet, name) == []
    assert running.resolver.stats.denied == 3


def test_an_escaped_dot_is_no_subdomain(internet: Internet, start: Callable[..., Running]) -> None:
    # `x\.allowed.test` is the label "x.allowed" under "test": its text ends with
    # ".allowed.test", but it is no name under allowed.test.
    running = start(NetworkPolicy.parse("allowlist", ["*.allowed.test"]))
    name = unique("allowed").replace(".", "\\.") + ".test"
    assert running.ask(name).rcode() == dns.rcode.NXDOMAIN
    assert running.allowed == []
    [event] = running.take_events()
    assert event.decision == "denied"
    allowed = unique("allowed.test")
    running.ask(allowed)
    wait_until(lambda: asked_upstream(internet, allowed), "the allowed query upstream")
    assert asked_upstream(internet, name) == []


def test_rebinding_answers_lose_their_private_addresses(start: Callable[..., Running]) -> None:
    # rebind.test and private.test resolve to 10.99.0.10, metadata.test to 169.254.169.254.
    running = start(
        NetworkPolicy.parse("allowlist", ["rebind.test", "metadata.test", "allowed.test"])
    )
    for name in ("rebind.test", "metadata.test"):
        reply = running.ask(name)
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == []
    assert running.allowed == []
    events = running.take_events()
    assert [(e.decision, e.name, e.answers) for e in events] == [
        ("denied", "rebind.test", (fake.PRIVATE_V4,)),
        ("denied", "metadata.test", (fake.METADATA_V4,)),
    ]
    assert events[0].rule.startswith("a private") and events[1].rule.startswith("a link-local")
    assert running.resolver.stats.rebinding == 2


def test_a_cidr_entry_lets_a_name_resolve_into_its_private_range(
    start: Callable[..., Running],
) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["rebind.test", "10.99.0.0/24"]))
    assert addresses(running.ask("rebind.test")) == [fake.PRIVATE_V4]
    assert running.allowed == [("rebind.test", [fake.PRIVATE_V4], 60.0)]


def test_internet_mode_answers_every_public_name(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("internet"))
    assert addresses(running.ask("denied.test")) == [fake.DENIED_V4]
    assert addresses(running.ask("allowed.test", "AAAA", tcp=True)) == [fake.ALLOWED_V6]
    assert addresses(running.ask("private.test")) == []  # public names only
    nowhere = running.ask("nowhere.test")  # no such name upstream: its NXDOMAIN, forwarded
    assert nowhere.rcode() == dns.rcode.NXDOMAIN
    assert running.allowed == [
        ("internet", [fake.DENIED_V4], 60.0),
        ("internet", [fake.ALLOWED_V6], 60.0),
    ]
    events = running.take_events()
    assert [
        (e.decision, e.rule, e.name, e.protocol) for e in events if e.decision == "allowed"
    ] == [
        ("allowed", "internet", "denied.test", "udp"),
        ("allowed", "internet", "allowed.test", "tcp"),
        ("allowed", "internet", "nowhere.test", "udp"),
    ]


def test_tcp_queries_follow_the_same_policy(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    with running.socket(socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((ADDRESS, 53))
        # Several queries on one connection, as RFC 7766 allows.
        for name, rcode in (("allowed.test", "NOERROR"), ("denied.test", "NXDOMAIN")) * 2:
            reply = dns.query.tcp(dns.message.make_query(name, "A"), ADDRESS, sock=sock)
            assert dns.rcode.to_text(reply.rcode()) == rcode
    assert len(running.allowed) == 2
    assert {e.protocol for e in running.take_events()} == {"tcp"}


def test_set_policy_takes_effect_on_the_next_query(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    assert addresses(running.ask("allowed.test")) == [fake.ALLOWED_V4]
    assert running.ask("denied.test").rcode() == dns.rcode.NXDOMAIN
    other = NetworkPolicy.parse("allowlist", ["denied.test"])
    running.host.call(lambda: running.resolver.set_policy(other))
    assert running.ask("allowed.test").rcode() == dns.rcode.NXDOMAIN
    assert addresses(running.ask("denied.test")) == [fake.DENIED_V4]
    running.host.call(lambda: running.resolver.set_policy(NetworkPolicy.parse("none")))
    assert running.ask("denied.test").rcode() == dns.rcode.NXDOMAIN
    assert running.take_events()[-1].rule == "none"


def test_any_is_refused_and_other_types_add_no_addresses(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    assert running.ask("allowed.test", "ANY").rcode() == dns.rcode.REFUSED
    assert running.ask("allowed.test", "ANY", tcp=True).rcode() == dns.rcode.REFUSED
    for rdtype in ("TXT", "MX", "HTTPS"):
        reply = running.ask("allowed.test", rdtype)
        assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == []
    assert running.ask("denied.test", "TXT").rcode() == dns.rcode.NXDOMAIN
    assert running.allowed == []


def test_several_upstreams_the_first_that_answers_wins(start: Callable[..., Running]) -> None:
    # 192.0.2.10 is a fake host with no DNS server (port unreachable); the IPv6 one is.
    upstream = [f"{fake.ALLOWED_V4}:53", f"[{fake.DNS_V6}]:53"]
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]), upstream, timeout=2.0)
    assert addresses(running.ask("allowed.test")) == [fake.ALLOWED_V4]
    running.host.run(running.resolver.close())
    failing = start(NetworkPolicy.parse("internet"), [f"{fake.ALLOWED_V4}:53"], timeout=1.0)
    assert failing.ask("allowed.test").rcode() == dns.rcode.SERVFAIL
    assert failing.allowed == [] and failing.resolver.stats.upstream_failures == 1


# -- hostile input ---------------------------------------------------------------------------


def test_malformed_packets_are_dropped_and_counted(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    response = dns.message.make_response(dns.message.make_query("allowed.test", "A"))
    with running.socket() as sock:
        for packet in (b"", b"\x00" * 5, secrets.token_bytes(300), response.to_wire()):
            sock.sendto(packet, (ADDRESS, 53))
        assert select.select([sock], [], [], 0.5)[0] == [], "answered a malformed packet"
    with running.socket(socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((ADDRESS, 53))
        sock.sendall(b"\x00\x05hello")
        assert sock.recv(100) == b""  # the connection is closed, nothing answered
    assert addresses(running.ask("allowed.test")) == [fake.ALLOWED_V4]
    stats = running.resolver.stats
    assert (stats.malformed, stats.queries) == (5, 1)


def test_other_classes_opcodes_and_question_counts_get_an_error(
    start: Callable[..., Running],
) -> None:
    running = start(NetworkPolicy.parse("internet"))
    chaos = dns.message.make_query("version.bind", "TXT", "CH")  # the classic fingerprint
    notify = dns.message.make_query("allowed.test", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    two = dns.message.make_query("allowed.test", "A")
    two.question.append(dns.message.make_query("denied.test", "A").question[0])
    with running.socket() as sock:
        replies = [dns.query.udp(q, ADDRESS, timeout=10, sock=sock) for q in (chaos, notify, two)]
    assert [dns.rcode.to_text(r.rcode()) for r in replies] == ["REFUSED", "NOTIMP", "FORMERR"]
    assert all(not r.answer for r in replies) and running.allowed == []
    assert running.resolver.stats.refused == 3


def test_a_closed_resolver_answers_nothing_and_frees_its_address(
    start: Callable[..., Running],
) -> None:
    first = start(NetworkPolicy.parse("internet"))
    assert addresses(first.ask("allowed.test")) == [fake.ALLOWED_V4]
    first.host.run(first.resolver.close())
    first.host.run(first.resolver.close())  # twice: no error
    with first.socket(socket.SOCK_STREAM) as sock, pytest.raises(ConnectionRefusedError):
        sock.connect((ADDRESS, 53))
    second = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    assert addresses(second.ask("allowed.test", tcp=True)) == [fake.ALLOWED_V4]


def test_a_udp_flood_is_bounded(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["*.allowed.test"]), max_in_flight=2)
    queries = [
        dns.message.make_query(f"h{i}.allowed.test" if i % 2 else f"h{i}.denied.test", "A")
        for i in range(10_000)
    ]
    with running.socket() as sock:
        sock.setblocking(False)
        for i, query in enumerate(queries):
            sock.sendto(query.to_wire() if i % 10 else b"\xff" * 12, (ADDRESS, 53))
            # Drain replies as they come (without waiting) so that ours is not the
            # buffer that fills.
            while select.select([sock], [], [], 0)[0]:
                sock.recv(4096)
    stats = running.resolver.stats
    wait_until(lambda: running.host.call(lambda: not running.resolver._tasks), "the flood to end")
    assert stats.peak_in_flight <= 2
    assert stats.overloaded > 0  # answered SERVFAIL rather than queued
    assert stats.malformed > 0 and stats.denied > 0 and stats.forwarded > 0
    # Every well-formed query was answered one way or another.
    answered = stats.denied + stats.forwarded + stats.overloaded + stats.upstream_failures
    assert stats.queries == answered + stats.refused
    # The events are the log's to rate-limit: a burst kept, the rest counted.
    events = running.take_events()
    suppressed = sum(e.count for e in events if e.kind == "suppressed")
    assert (
        len([e for e in events if e.kind == "dns"]) + suppressed == stats.denied + stats.forwarded
    )
    assert addresses(running.ask("www.allowed.test")) == [fake.ALLOWED_V4]


def test_a_tcp_connection_flood_is_bounded(start: Callable[..., Running]) -> None:
    running = start(NetworkPolicy.parse("allowlist", ["allowed.test"]))
    connections = []
    try:
        for _ in range(40):
            sock = running.socket(socket.SOCK_STREAM)
            connections.append(sock)
            sock.settimeout(10)
            sock.connect((ADDRESS, 53))
        wait_until(lambda: running.resolver.stats.tcp_rejected == 40 - 16, "the excess closed")
    finally:
        for sock in connections:
            sock.close()
    wait_until(lambda: not running.resolver._tcp_clients, "the connections to close")
    assert addresses(running.ask("allowed.test", tcp=True)) == [fake.ALLOWED_V4]


# -- unit ------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("203.0.113.53", ("203.0.113.53", 53)),
        ("203.0.113.53:5353", ("203.0.113.53", 5353)),
        ("2001:db8::53", ("2001:db8::53", 53)),
        ("[2001:db8::53]:54", ("2001:db8::53", 54)),
        (" [2001:db8::53] ", ("2001:db8::53", 53)),
    ],
)
def test_upstream_servers_are_addresses_with_optional_ports(
    text: str, parsed: tuple[str, int]
) -> None:
    assert parse_upstream(text) == parsed


@pytest.mark.unit
@pytest.mark.parametrize("text", ["dns.example", "203.0.113.53:0", "203.0.113.53:x", "[::1", ""])
def test_a_bad_upstream_is_refused_saying_what_to_write(text: str) -> None:
    with pytest.raises(InvalidRequest, match="write an IP address"):
        parse_upstream(text)


@pytest.mark.unit
def test_a_resolver_needs_an_upstream() -> None:
    async def allow(rule: Rule, addresses: list[str], ttl: float) -> None:
        raise AssertionError("never called")

    with pytest.raises(InvalidRequest, match="at least one upstream"):
        SandboxResolver(NetworkPolicy.parse("internet"), [], NetworkEventLog(), allow)
    assert ipaddress.ip_address(ADDRESS).is_loopback


@pytest.mark.unit
def test_the_hosts_nameservers_are_the_default_upstream(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# made by hand\nsearch example\nnameserver 203.0.113.53\nnameserver  2001:db8::53 \n"
        "nameserver not-an-address\noptions edns0\n"
    )
    assert host_nameservers(str(resolv)) == ["203.0.113.53", "2001:db8::53"]
    assert host_nameservers(str(tmp_path / "missing")) == []


def upstream_reply(
    query: dns.message.Message, answer: str, authority: str = ""
) -> dns.message.Message:
    """An upstream server's reply to `query` with these sections (zone-file lines), and
    a glue address in the additional section."""
    [question] = query.question
    lines = [
        f"id {query.id}", "opcode QUERY", "rcode NOERROR", "flags QR RD RA",
        ";QUESTION", f"{question.name} IN {dns.rdatatype.to_text(question.rdtype)}",
        ";ANSWER", answer.strip(), ";AUTHORITY", authority.strip(),
        ";ADDITIONAL", "ns.test. 60 IN A 10.1.1.1",
    ]  # fmt: skip
    text = "\n".join(line for line in lines if line)
    return dns.message.from_text(text)


@pytest.mark.unit
def test_a_cname_chains_final_addresses_go_under_the_name_asked() -> None:
    policy = NetworkPolicy.parse("allowlist", ["www.allowed.test"])
    query = dns.message.make_query("www.allowed.test", "A")
    upstream = upstream_reply(
        query,
        "www.allowed.test. 300 IN CNAME cdn.elsewhere.test.\n"
        "cdn.elsewhere.test. 300 IN CNAME edge.cdn.test.\n"
        "edge.cdn.test. 120 IN A 192.0.2.10\n"
        "edge.cdn.test. 120 IN A 10.0.0.1\n"
        "edge.cdn.test. 120 IN AAAA 2001:db8::10\n"  # not asked: not passed
        "elsewhere.test. 120 IN A 192.0.2.99\n"  # not on the chain: not passed
        "edge.cdn.test. 120 IN CNAME www.allowed.test.\n",  # a loop ends the chain
        "test. 60 IN NS ns.test.\ntest. 60 IN SOA ns.test. admin.test. 1 2 3 4 5",
    )
    answer = filter_answer(policy, query, upstream)
    assert answer.allowed == ["192.0.2.10"]
    assert list(answer.dropped.values()) == [["10.0.0.1"]]
    assert [str(rrset).split() for rrset in answer.reply.answer] == [
        ["www.allowed.test.", "300", "IN", "CNAME", "cdn.elsewhere.test."],
        ["cdn.elsewhere.test.", "300", "IN", "CNAME", "edge.cdn.test."],
        ["edge.cdn.test.", "120", "IN", "A", "192.0.2.10"],
        ["edge.cdn.test.", "120", "IN", "CNAME", "www.allowed.test."],
    ]
    # Only the SOA of the authority section, and no glue.
    assert [rrset.rdtype for rrset in answer.reply.authority] == [dns.rdatatype.SOA]
    assert answer.reply.additional == []
    assert answer.ttl == 120


@pytest.mark.unit
@pytest.mark.parametrize(("ttl", "allowed_for", "cached_for"), [(5, 60, 5), (300, 300, 300),
                                                                (10**7, 86400, 86400)])  # fmt: skip
def test_an_address_stays_allowed_at_least_as_long_as_it_is_cached(
    ttl: int, allowed_for: float, cached_for: int
) -> None:
    query = dns.message.make_query("allowed.test", "AAAA")
    upstream = upstream_reply(query, f"allowed.test. {ttl} IN AAAA 2001:db8::10")
    answer = filter_answer(NetworkPolicy.parse("internet"), query, upstream)
    assert (answer.allowed, answer.ttl) == (["2001:db8::10"], allowed_for)
    assert answer.reply.answer[0].ttl == cached_for


@pytest.mark.unit
def test_other_types_pass_without_addresses() -> None:
    query = dns.message.make_query("allowed.test", "MX")
    upstream = upstream_reply(
        query, "allowed.test. 60 IN MX 10 mail.allowed.test.\nallowed.test. 60 IN A 192.0.2.10"
    )
    answer = filter_answer(NetworkPolicy.parse("internet"), query, upstream)
    assert answer.allowed == [] and answer.dropped == {}
    assert [rrset.rdtype for rrset in answer.reply.answer] == [dns.rdatatype.MX]


@pytest.mark.unit
def test_ipv4_mapped_and_translated_answers_are_dropped() -> None:
    query = dns.message.make_query("allowed.test", "AAAA")
    upstream = upstream_reply(
        query,
        "allowed.test. 60 IN AAAA ::ffff:192.0.2.10\n"
        "allowed.test. 60 IN AAAA 64:ff9b::a63:a\n"
        "allowed.test. 60 IN AAAA fe80::1\n"
        "allowed.test. 60 IN AAAA 2001:db8::10",
    )
    policy = NetworkPolicy.parse("allowlist", ["allowed.test", "192.0.2.0/24"])
    answer = filter_answer(policy, query, upstream)
    assert answer.allowed == ["2001:db8::10"]
    assert sorted(a for dropped in answer.dropped.values() for a in dropped) == [
        "64:ff9b::a63:a", "::ffff:192.0.2.10", "fe80::1"
    ]  # fmt: skip
