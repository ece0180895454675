"""A sandbox's network events in memory: recorded without blocking, rate limited, read
in batches.

Provisional (the lead's version replaces it on merge); the same interface.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Per sandbox: a burst of this many events, then this many a second; the rest are
# counted, not kept ("suppressed" events carry the exact counts).
BURST = 100
RATE = 20.0
# Events kept while nobody reads them, whatever the bucket says.
MAX_PENDING = 10_000


@dataclass(frozen=True)
class NetworkEvent:
    kind: str  # "dns" | "connect" | "suppressed"
    decision: str  # "allowed" | "denied"
    rule: str  # the rule that decided: the allowlist entry as written, or a label
    protocol: str = ""  # "tcp" | "udp" | ""
    address: str = ""
    port: int = 0
    name: str = ""  # the DNS name asked (dns)
    answers: tuple[str, ...] = ()
    count: int = 1  # "suppressed": how many events were folded into this one
    at: float = field(default_factory=time.time)


class NetworkEventLog:
    """One sandbox's events between the recorders (resolver, NFLOG) and the store."""

    def __init__(
        self,
        *,
        rate: float = RATE,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._filled = clock()
        self._pending: list[NetworkEvent] = []
        self._suppressed: Counter[tuple[str, str]] = Counter()
        self._ready = asyncio.Event()

    def add(self, event: NetworkEvent) -> None:
        """Record an event, or count it when the sandbox is over its rate. Never blocks;
        call it on the event loop."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._filled) * self._rate)
        self._filled = now
        if self._tokens >= 1 and len(self._pending) < MAX_PENDING:
            self._tokens -= 1
            self._pending.append(event)
        else:
            self._suppressed[(event.decision, event.rule)] += event.count
        self._ready.set()

    def drain(self) -> list[NetworkEvent]:
        """What is recorded and not yet read, without waiting: the kept events, then one
        "suppressed" event per (decision, rule) with the exact count folded away."""
        batch, self._pending = self._pending, []
        now = time.time()
        for (decision, rule), count in sorted(self._suppressed.items()):
            batch.append(NetworkEvent("suppressed", decision, rule, count=count, at=now))
        self._suppressed.clear()
        self._ready.clear()
        return batch

    async def next_batch(self) -> list[NetworkEvent]:
        """Wait for events and return every one recorded so far (see `drain`)."""
        while True:
            await self._ready.wait()
            batch = self.drain()
            if batch:
                return batch
