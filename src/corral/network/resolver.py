"""A sandbox's own DNS resolver: the only way its code learns an address by name.

It listens on 127.0.0.53:53 (UDP and TCP) *inside* the sandbox's network namespace, with
sockets made there (`corral.network.setns`) and served from the host's event loop, so it
asks its upstream servers from the host while the sandbox can reach only it. For each
query it asks the sandbox's `NetworkPolicy`:

- a name the policy does not answer gets NXDOMAIN, without going upstream, and a "dns"
  "denied" event;
- an allowed name is asked upstream; addresses in the always-denied ranges are dropped
  from the answer unless a CIDR entry names them (a public name that resolves to a
  private address is DNS rebinding); the rest are handed to `allow` — which opens them
  in the kernel's rules for max(TTL, 60 s) — *before* the reply leaves, so the
  connection that follows the answer is already allowed; then a "dns" "allowed" event.

Only A and AAAA answers add addresses (a CNAME chain's final addresses go under the
queried name's rule); other types of an allowed name pass through without adding any;
ANY is refused. The resolver must survive a flood from the sandbox: at most
`max_in_flight` queries wait for upstream at once (the rest get SERVFAIL), at most
`MAX_TCP_CLIENTS` TCP connections are open, malformed packets are dropped; each is
counted in `stats`. Events are rate limited by the `NetworkEventLog`, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from corral.errors import InvalidRequest
from corral.network.addresses import DENIED, denied_range, unmapped
from corral.network.events import NetworkEvent, NetworkEventLog
from corral.network.policy import DNS_PORT, NetworkPolicy, Rule
from corral.network.setns import run_in_netns

log = logging.getLogger(__name__)

ADDRESS = "127.0.0.53"  # where the sandbox's /etc/resolv.conf points
MAX_IN_FLIGHT = 64  # queries waiting for upstream at once, per sandbox
MAX_TCP_CLIENTS = 16
TCP_IDLE = 10.0  # seconds a TCP client may wait between queries (RFC 7766: a few)
UPSTREAM_TIMEOUT = 2.0  # per upstream server, per query
MIN_TTL = 60  # an address stays allowed at least this long after it was answered
MAX_TTL = 86400  # and a sandbox caches an answer at most this long (Unbound's default)
UDP_PAYLOAD = 1232  # what we advertise upstream (the DNS flag day 2020 size)

Allow = Callable[[Rule, list[str], float], Awaitable[None]]

_ADDRESS_TYPES = frozenset({dns.rdatatype.A, dns.rdatatype.AAAA})
_REFUSED_TYPES = frozenset({dns.rdatatype.ANY, dns.rdatatype.AXFR, dns.rdatatype.IXFR})
_MAPPED = next(e.reason for e in DENIED if e.network == ipaddress.ip_network("::ffff:0:0/96"))
# A label of a host name, as bytes: a "." inside a label (`a\.allowed.test` is the label
# "a.allowed" under "test") must not pass for a subdomain of an allowed name.
_HOST_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")


@dataclass
class ResolverStats:
    """What the resolver did with what the sandbox sent it."""

    queries: int = 0  # well-formed queries
    denied: int = 0  # NXDOMAIN: a name the policy does not answer
    refused: int = 0  # ANY, zone transfers, other classes and opcodes
    forwarded: int = 0  # answered from upstream
    rebinding: int = 0  # addresses dropped from answers (always-denied ranges)
    upstream_failures: int = 0  # SERVFAIL: no upstream answered (or `allow` failed)
    malformed: int = 0  # packets dropped: not a DNS query
    overloaded: int = 0  # SERVFAIL: `max_in_flight` queries already upstream
    tcp_rejected: int = 0  # TCP connections closed at once: MAX_TCP_CLIENTS open
    unsent: int = 0  # UDP replies dropped: the socket's send buffer is full
    peak_in_flight: int = 0


@dataclass(frozen=True)
class _Forward:
    """A query for an allowed name, to ask upstream."""

    query: dns.message.Message
    name: str
    protocol: str


def parse_upstream(text: str) -> tuple[str, int]:
    """(address, port) of an upstream server: `203.0.113.53`, `203.0.113.53:5353`,
    `2001:db8::53` or `[2001:db8::53]:5353`."""
    host, port = text.strip(), str(DNS_PORT)
    if host.startswith("["):
        host, closed, rest = host[1:].partition("]")
        host = host if closed else ""
        port = rest.removeprefix(":") or port
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        address, number = None, 0
    if address is None or not 1 <= number <= 65535:
        raise InvalidRequest(
            f"DNS upstream {text!r} is not an address: write an IP address with an "
            "optional port, such as 192.0.2.53, 192.0.2.53:5353 or [2001:db8::53]:53"
        )
    return str(address), number


def host_nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The host's own DNS servers (its resolv.conf's `nameserver` lines, in order): the
    upstream of sandboxes' resolvers unless the configuration names others."""
    try:
        lines = Path(resolv_conf).read_text().splitlines()
    except OSError:
        return []
    servers = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):
                servers.append(str(ipaddress.ip_address(words[1])))
    return servers


class SandboxResolver:
    """One sandbox's resolver (see the module docstring). Use it from one event loop."""

    def __init__(
        self,
        policy: NetworkPolicy,
        upstream: Sequence[str],
        events: NetworkEventLog,
        allow: Allow,
        *,
        timeout: float = UPSTREAM_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._upstream = [parse_upstream(u) for u in upstream]
        if not self._upstream:
            raise InvalidRequest(
                "a sandbox's resolver needs at least one upstream DNS server: give the "
                "host a nameserver in /etc/resolv.conf, or name one in the configuration"
            )
        self._policy = policy
        self._events = events
        self._allow = allow
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self.stats = ResolverStats()
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_paused = False
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def set_policy(self, policy: NetworkPolicy) -> None:
        """Answer by `policy` from the next query on (and queries still upstream are
        answered by it too, when their answer comes back)."""
        self._policy = policy

    async def start(self, netns_path: str, address: str = ADDRESS) -> None:
        """Listen on `address`:53, UDP and TCP, inside the network namespace at
        `netns_path` (which needs CAP_SYS_ADMIN over it: see `corral.network.setns`)."""
        udp, tcp = await run_in_netns(netns_path, lambda: _listen(address))
        await self.serve(udp, tcp)

    async def serve(self, udp: socket.socket, tcp: socket.socket) -> None:
        """Serve on sockets made elsewhere (a bound UDP one and a listening TCP one): what
        `start` does once it made them, and what a launcher that made them calls."""
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _UDPService(self), sock=udp)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)

    async def close(self) -> None:
        """Stop listening and drop what is in flight. Safe to call twice."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for writer in list(self._tcp_clients):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # -- a query, from bytes to bytes ------------------------------------------------------------

    def _screen(self, wire: bytes, protocol: str) -> bytes | _Forward | None:
        """The reply to a query that needs no upstream, the query to forward, or None for
        a packet that is dropped."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # any bytes the sandbox sends: what fails to parse is dropped
            self.stats.malformed += 1
            return None
        if query.flags & dns.flags.QR:  # a response: never answer one (reflection loops)
            self.stats.malformed += 1
            return None
        self.stats.queries += 1
        if query.opcode() != dns.opcode.QUERY:
            self.stats.refused += 1
            return _render(_reply(query, dns.rcode.NOTIMP), query, protocol)
        if len(query.question) != 1:
            self.stats.refused += 1
            return _render(_reply(query, dns.rcode.FORMERR), query, protocol)
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            self.stats.refused += 1
            return _render(_reply(query, dns.rcode.REFUSED), query, protocol)
        name = question.name.to_text(omit_final_dot=True).lower()
        if self._rule(question.name) is None:
            return self._deny(query, name, protocol)
        if question.rdtype in _REFUSED_TYPES:
            self.stats.refused += 1
            return _render(_reply(query, dns.rcode.REFUSED), query, protocol)
        return _Forward(query, name, protocol)

    def _rule(self, name: dns.name.Name) -> Rule | None:
        """The rule the current policy answers `name` under; None for a name it does not
        answer, or that is no host name at all."""
        labels = name.labels[:-1] if name.is_absolute() else name.labels
        if not labels or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            return None
        return self._policy.answer(name.to_text(omit_final_dot=True))

    def _deny(self, query: dns.message.Message, name: str, protocol: str) -> bytes:
        self.stats.denied += 1
        rule = "none" if self._policy.mode == "none" else "not on the allowlist"
        self._events.add(NetworkEvent("dns", "denied", rule, protocol=protocol, name=name))
        return _render(_reply(query, dns.rcode.NXDOMAIN), query, protocol)

    def _reserve(self) -> bool:
        """Take a place upstream; False (and counted) when all are taken."""
        if self._in_flight >= self._max_in_flight:
            self.stats.overloaded += 1
            return False
        self._in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
        return True

    async def _resolve(self, ask: _Forward) -> bytes:
        """The reply to an allowed query, from upstream (a place taken by `_reserve`)."""
        try:
            upstream = await self._ask_upstream(ask.query.question[0])
        finally:
            self._in_flight -= 1
        # The policy may have changed while upstream thought: answer by the current one.
        rule = self._rule(ask.query.question[0].name)
        if rule is None:
            return self._deny(ask.query, ask.name, ask.protocol)
        if upstream is None:
            self.stats.upstream_failures += 1
            return _render(_reply(ask.query, dns.rcode.SERVFAIL), ask.query, ask.protocol)
        answer = filter_answer(self._policy, ask.query, upstream)
        if answer.allowed:
            try:
                await self._allow(rule, answer.allowed, answer.ttl)
            except Exception:  # fail closed: no address the rules may not have opened
                log.exception("could not allow the addresses of %s", ask.name)
                self.stats.upstream_failures += 1
                return _render(_reply(ask.query, dns.rcode.SERVFAIL), ask.query, ask.protocol)
        self.stats.forwarded += 1
        for reason, addresses in answer.dropped.items():
            self.stats.rebinding += len(addresses)
            self._record(ask, "denied", reason, addresses)
        if answer.allowed or not answer.dropped:
            self._record(ask, "allowed", rule.text, answer.allowed)
        return _render(answer.reply, ask.query, ask.protocol)

    def _record(self, ask: _Forward, decision: str, rule: str, answers: list[str]) -> None:
        event = NetworkEvent(
            "dns", decision, rule, ask.protocol, name=ask.name, answers=(*answers,)
        )
        self._events.add(event)

    async def _ask_upstream(self, question: dns.rrset.RRset) -> dns.message.Message | None:
        """The first upstream answer that is not a server failure (UDP, then TCP when it
        is truncated); the last failure when every server fails; None when none answers."""
        request = dns.message.make_query(
            question.name, question.rdtype, use_edns=0, payload=UDP_PAYLOAD
        )
        last = None
        for host, port in self._upstream:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    request, host, timeout=self._timeout, port=port
                )
            except (dns.exception.DNSException, OSError, EOFError, ValueError) as exc:
                log.debug("DNS upstream %s:%d failed: %s", host, port, exc)
                continue
            if response.rcode() not in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                return response
            last = response
        return last

    # -- transports --------------------------------------------------------------------------------

    def _datagram(self, wire: bytes, client: tuple[str, int]) -> None:
        screened = self._screen(wire, "udp")
        if isinstance(screened, _Forward):
            if not self._reserve():
                self._send(_render(_reply(screened.query, dns.rcode.SERVFAIL), screened.query,
                                   "udp"), client)  # fmt: skip
                return
            task = asyncio.get_running_loop().create_task(self._answer_datagram(screened, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif screened is not None:
            self._send(screened, client)

    async def _answer_datagram(self, ask: _Forward, client: tuple[str, int]) -> None:
        self._send(await self._resolve(ask), client)

    def _send(self, reply: bytes, client: tuple[str, int]) -> None:
        if self._udp is None or self._udp.is_closing():
            return
        # Replies the kernel would not take wait in the transport's buffer; past its
        # high-water mark (64 KiB) the transport pauses us: drop rather than grow it.
        if self._udp_paused:
            self.stats.unsent += 1
            return
        self._udp.sendto(reply, client)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= MAX_TCP_CLIENTS:
            self.stats.tcp_rejected += 1
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._tcp_clients.add(writer)
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                wire = await asyncio.wait_for(
                    reader.readexactly(struct.unpack("!H", header)[0]), TCP_IDLE
                )
                screened = self._screen(wire, "tcp")
                if screened is None:
                    return  # garbage ends the connection, as at any server
                if isinstance(screened, _Forward):
                    if self._reserve():
                        screened = await self._resolve(screened)
                    else:
                        screened = _render(
                            _reply(screened.query, dns.rcode.SERVFAIL), screened.query, "tcp"
                        )
                writer.write(struct.pack("!H", len(screened)) + screened)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return  # the client left, or waited too long
        finally:
            self._tcp_clients.discard(writer)
            self._tasks.discard(task)
            writer.close()


@dataclass
class Answer:
    """What the sandbox is told about an allowed name, and what that lets it reach."""

    reply: dns.message.Message
    allowed: list[str]  # the addresses in the reply
    dropped: dict[str, list[str]]  # always-denied addresses left out, by range
    ttl: float  # how long `allowed` stay allowed: at least as long as the reply is cached


def filter_answer(
    policy: NetworkPolicy, query: dns.message.Message, upstream: dns.message.Message
) -> Answer:
    """The reply to `query` made from `upstream`'s answer, under `policy`.

    Only records about the name asked pass: its own and those of the CNAME chain that
    starts at it. Only an address query's answer carries addresses (the chain's final
    addresses all count for the name asked); other types' answers pass without any A or
    AAAA. Addresses in always-denied ranges are dropped unless a CIDR entry of `policy`
    names them. Of the other sections only a negative answer's SOA passes (so the sandbox
    can cache a "no such name"), never glue."""
    reply = _reply(query, upstream.rcode())
    asked = query.question[0].rdtype
    chain = _chain(query.question[0].name, upstream.answer)
    allowed: list[str] = []
    dropped: dict[str, list[str]] = {}
    ttl = 0
    for rrset in upstream.answer:
        if rrset.name not in chain:
            continue
        if rrset.rdtype not in _ADDRESS_TYPES:
            if asked not in _ADDRESS_TYPES or rrset.rdtype == dns.rdatatype.CNAME:
                reply.answer.append(rrset)
            continue
        if rrset.rdtype != asked:
            continue
        kept = []
        for rdata in rrset:
            reason = _always_denied(policy, rdata.address)
            if reason is None:
                kept.append(rdata)
                allowed.append(str(rdata.address))
            else:
                dropped.setdefault(reason, []).append(str(rdata.address))
        if kept:
            reply.answer.append(dns.rrset.from_rdata_list(rrset.name, rrset.ttl, kept))
            ttl = max(ttl, rrset.ttl)
    reply.authority = [r for r in upstream.authority if r.rdtype == dns.rdatatype.SOA]
    for rrset in (*reply.answer, *reply.authority):
        rrset.update_ttl(MAX_TTL)
    return Answer(reply, allowed, dropped, float(min(max(ttl, MIN_TTL), MAX_TTL)))


def _chain(name: dns.name.Name, answer: list[dns.rrset.RRset]) -> set[dns.name.Name]:
    """`name` and the names its CNAME chain in `answer` leads to (a loop ends it)."""
    targets = {r.name: r[0].target for r in answer if r.rdtype == dns.rdatatype.CNAME and r}
    chain = {name}
    target = targets.get(name)
    while target is not None and target not in chain:
        chain.add(target)
        target = targets.get(target)
    return chain


def _always_denied(policy: NetworkPolicy, text: str) -> str | None:
    """The always-denied range an answered address is in, or None when the sandbox may
    have it: public, or named by one of the policy's CIDR entries."""
    address = ipaddress.ip_address(text)
    if unmapped(address) is not address:
        return _MAPPED  # an AAAA answer naming an IPv4 address only smuggles it
    for rule in policy.allow:
        if rule.network is not None and address in rule.network:
            return None
    always = denied_range(address)
    return None if always is None else always.reason


class _UDPService(asyncio.DatagramProtocol):
    def __init__(self, resolver: SandboxResolver) -> None:
        self._resolver = resolver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._resolver._datagram(data, addr)

    def pause_writing(self) -> None:
        self._resolver._udp_paused = True

    def resume_writing(self) -> None:
        self._resolver._udp_paused = False

    def error_received(self, exc: Exception) -> None:
        log.debug("the sandbox's resolver could not send a reply: %s", exc)


def _listen(address: str) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on `address`:53, here."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    tcp = socket.socket(family, socket.SOCK_STREAM)
    try:
        udp.bind((address, DNS_PORT))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((address, DNS_PORT))
        tcp.listen(64)
    except BaseException:
        udp.close()
        tcp.close()
        raise
    for sock in (udp, tcp):
        sock.setblocking(False)
    return udp, tcp


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    reply = dns.message.make_response(query, recursion_available=True)
    reply.set_rcode(rcode)
    return reply


def _render(reply: dns.message.Message, query: dns.message.Message, protocol: str) -> bytes:
    """`reply` as bytes; over UDP, no longer than the client said it takes (512 without
    EDNS), truncated with TC set so that it asks again over TCP."""
    limit = 65535
    if protocol == "udp":
        limit = max(512, query.payload) if query.edns >= 0 else 512
    with contextlib.suppress(dns.exception.DNSException):
        return reply.to_wire(max_size=limit, prefer_truncation=True)
    # A reply that cannot be rendered at all (it should not happen): fail the query.
    return _reply(query, dns.rcode.SERVFAIL).to_wire()
