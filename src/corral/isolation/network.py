"""The live network of one sandbox: its namespace's rules, resolver and kernel log.

`Sandbox` holds one of these when it was created with `internet` or `allowlist`. It makes
the namespace (`corral.isolation.netns`), then listens to the rules' kernel log (NFLOG)
and starts the sandbox's DNS resolver there, all before the sandbox's first instruction;
it swaps the rules when the policy changes, opens the addresses the resolver answers,
and turns log lines into network events.

Counting what the kernel did not log: each decision's log rule is rate limited, its
named counter is not. `reconcile` reads the counters and records what the log lines
missed as one "suppressed" event per rule, so a flood costs a few events and loses no
count; a log line that arrives after its packet was already counted so is absorbed.
It runs a moment after log lines arrive, before a policy change (the counters restart
with the new rules) and when the sandbox ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import Counter

from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import SandboxStartFailed
from corral.isolation import netns, nsholder, usernet
from corral.isolation.footprint import Footprint
from corral.limits import Limits
from corral.network import nftables, resolver
from corral.network.events import NetworkEvent, NetworkEventLog
from corral.network.nflog import NETLINK_NETFILTER, NflogReader
from corral.network.policy import DNS_PORT, INTERNET, NetworkPolicy, Rule
from corral.network.setns import call_in_netns

log = logging.getLogger("corral.isolation")

# The NFLOG group of every sandbox's log rules: each sandbox has a namespace of its own.
NFLOG_GROUP = 1
# How long after a log line the counters are read: a flood is summed up this often.
RECONCILE_DELAY = 2.0


class SandboxNetwork:
    """One sandbox's network (see the module docstring). Use it from one event loop."""

    def __init__(
        self,
        sandbox_id: str,
        footprint: Footprint,
        settings: Settings,
        policy: NetworkPolicy,
        limits: Limits,
        events: NetworkEventLog,
    ) -> None:
        self._id = sandbox_id
        self._footprint = footprint
        self._settings = settings
        self.policy = policy
        self._limits = limits
        self._events = events
        self._labels = nftables.labels(policy)
        self._addresses: netns.Addresses | None = None
        # Without root: the holder and slirp4netns uplink (`corral.isolation.usernet`),
        # and the host's own addresses, which such a sandbox must never reach.
        self._rootless = os.geteuid() != 0
        self._usernet: usernet.UserNet | None = None
        self._host_networks = usernet.host_networks() if self._rootless else []
        self._resolver: resolver.SandboxResolver | None = None
        self._nflog: NflogReader | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconciling: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # Per label index: packets accounted for (an event each, or in a "suppressed"
        # one), and how many of those were counted before their log line came.
        self._accounted: Counter[int] = Counter()
        self._ahead: Counter[int] = Counter()

    @property
    def path(self) -> str:
        assert self._footprint.netns is not None
        return self._footprint.netns

    def reserve(self) -> None:
        """Record the namespace, veth and address slot in the footprint (before the
        sandbox's launch is planned: the plan joins that namespace). Without root: start
        the namespace's holder, recorded so."""
        if not self._rootless:
            self._addresses = netns.reserve(self._footprint, self._settings.runtime_dir)
        else:  # its holder starts now, while the launch is prepared
            self._usernet = usernet.start(self._footprint, str(self._settings.guest_python))

    async def make(self) -> None:
        """The namespace, uplink and rules, then the log reader and the resolver."""
        script = self._ruleset(self.policy, fresh=True)
        if self._usernet is not None:
            await asyncio.to_thread(usernet.build, self._usernet, self._footprint, script)
        else:
            assert self._addresses is not None, "reserve first"
            await asyncio.to_thread(
                netns.build, self._footprint, self._addresses, self._limits, script
            )
        # Listening before the sandbox's first packet: the kernel keeps no log for later.
        self._nflog = await asyncio.to_thread(self._open_nflog)
        self._reader = asyncio.create_task(self._read_log(self._nflog))
        upstream = [s for s in self._settings.network_dns.split(",") if s.strip()]
        upstream = upstream or resolver.host_nameservers()
        if not upstream:
            log.warning(
                "no DNS server for the sandbox's resolver: names will not resolve in it; "
                "set CORRAL_NETWORK_DNS or give the host a nameserver",
                extra={"sandbox_id": self._id},
            )
            return
        self._resolver = resolver.SandboxResolver(self.policy, upstream, self._events, self.allow)
        if self._usernet is None:
            await self._resolver.start(self.path)
        else:  # the holder makes its sockets: this process may not enter the namespace
            holder, where = self._usernet.holder, (resolver.ADDRESS, DNS_PORT)
            udp = await asyncio.to_thread(
                holder.socket, socket.AF_INET, socket.SOCK_DGRAM, bind=where
            )
            tcp = await asyncio.to_thread(
                holder.socket, socket.AF_INET, socket.SOCK_STREAM, bind=where, listen=64
            )
            await self._resolver.serve(udp, tcp)

    def _open_nflog(self) -> NflogReader:
        if self._usernet is None:
            return NflogReader.open(self.path, NFLOG_GROUP)
        sock = self._usernet.holder.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        return NflogReader.adopt(sock, NFLOG_GROUP)

    def _nft(self, script: str, *, json_output: bool = False) -> str:
        """Run `script` in the sandbox's namespace (as root, entering it; without root,
        through its holder)."""
        if self._usernet is None:
            return call_in_netns(self.path, lambda: netns.nft(script, json_output=json_output))
        try:
            return self._usernet.holder.nft(script, json_output=json_output)
        except nsholder.NftError as exc:
            raise SandboxStartFailed(f"loading the sandbox's network rules failed: {exc}") from exc

    async def set_policy(self, policy: NetworkPolicy) -> None:
        """Swap the rules for `policy`'s in one transaction; open connections stay."""
        async with self._lock:
            await self.reconcile()
            await asyncio.to_thread(self._nft, self._ruleset(policy))
            self.policy, self._labels = policy, nftables.labels(policy)
            self._accounted.clear()
            self._ahead.clear()
            if self._resolver is not None:
                self._resolver.set_policy(policy)

    async def allow(self, rule: Rule, addresses: list[str], ttl: float) -> None:
        """Let the sandbox connect to `addresses`, which its resolver answered for a name
        `rule` allows, on `rule`'s ports, for `ttl` seconds (at least a minute)."""
        if not addresses or rule == INTERNET:
            return  # nothing to add: `internet` allows public addresses anyway
        async with self._lock:  # not while the rules (and their chains) are swapped
            if rule in self.policy.allow:  # else a policy change took it away meanwhile
                script = nftables.allow_elements(rule, addresses, ttl, self.policy)
                await asyncio.to_thread(self._nft, script)

    def record_log(self, prefix: str, protocol: str, address: str, port: int) -> None:
        """Record the connection a kernel log line reports, as a network event."""
        found = nftables.event(prefix, protocol, address, port, self._labels)
        if found is None:
            return
        n = int(prefix.rsplit(" ", 1)[1])
        if self._ahead[n]:  # already counted in a "suppressed" event
            self._ahead[n] -= 1
        else:
            self._accounted[n] += 1
            self._events.add(found)
        if self._reconciling is None or self._reconciling.done():
            self._reconciling = asyncio.create_task(self._reconcile_soon())

    async def reconcile(self) -> None:
        """Record what the counters saw and the log did not, as "suppressed" events."""
        try:
            listing = await asyncio.to_thread(self._nft, netns.COUNTERS, json_output=True)
            counted = netns.parse_counters(listing)
        except Exception as exc:  # the namespace is going: nothing more to count
            log.debug("could not read the network counters", extra={"error": str(exc)})
            return
        for name, packets in counted.items():
            n = int(name[1:])
            missing = packets - self._accounted[n]
            if n < len(self._labels) and missing > 0:
                label = self._labels[n]
                self._events.add(
                    NetworkEvent(
                        "suppressed", label.decision, label.rule, name="connect", count=missing
                    )
                )
                self._accounted[n] += missing
                self._ahead[n] += missing

    async def close(self) -> None:
        """Record the log lines already sent, count what is left, then stop the resolver.
        (The kernel sends each log line as its packet is logged, so a connection made just
        before the end is recorded as itself, not as a count.)"""
        await stop_tasks(self._reader)
        if self._nflog is not None:
            for record in self._nflog.pending():
                self.record_log(record.prefix, record.protocol, record.address, record.port)
        await stop_tasks(self._reconciling)
        await self.reconcile()
        if self._nflog is not None:
            self._nflog.close()
        if self._resolver is not None:
            await self._resolver.close()
        if self._usernet is not None:
            await asyncio.to_thread(self._usernet.close)

    async def _reconcile_soon(self) -> None:
        await asyncio.sleep(RECONCILE_DELAY)
        async with self._lock:
            await self.reconcile()

    async def _read_log(self, reader: NflogReader) -> None:
        async for record in reader.records():
            self.record_log(record.prefix, record.protocol, record.address, record.port)

    def _ruleset(self, policy: NetworkPolicy, *, fresh: bool = False) -> str:
        return nftables.render(
            policy,
            resolver=resolver.ADDRESS,
            also_denied=(netns.POOL4, netns.POOL6, *self._host_networks),
            limits=self._limits,
            log_group=NFLOG_GROUP,
            fresh=fresh,
            police=self._rootless,
        )
