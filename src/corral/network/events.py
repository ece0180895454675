"""Network events: each decision about a sandbox's traffic, recorded, rate limited.

The sandbox's resolver records DNS queries and the kernel's log records connections;
both `add` to the sandbox's `NetworkEventLog`, and the services drain it into the store.
A scanning sandbox must not flood the store, so the log passes a burst and then a steady
rate; what it holds back is not lost but counted, exactly, and reported as one
"suppressed" event per (kind, decision, rule) in the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

# Events per second kept once a burst is spent, and the burst.
RATE = 20.0
BURST = 200


@dataclass(frozen=True)
class NetworkEvent:
    kind: str  # "dns" | "connect" | "suppressed"
    decision: str  # "allowed" | "denied"
    rule: str  # the entry or rule that decided (see NetworkPolicy.decide)
    protocol: str = ""  # "tcp" | "udp"
    address: str = ""  # the destination
    port: int = 0
    name: str = ""  # the name asked (dns); for "suppressed", the kind it stands for
    answers: tuple[str, ...] = ()  # what the resolver answered (dns, allowed)
    count: int = 1  # how many events a "suppressed" one stands for
    at: float = field(default_factory=time.time)


class NetworkEventLog:
    """One sandbox's events waiting to be stored. Use it from the event loop's thread."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self._pending: list[NetworkEvent] = []
        self._suppressed: Counter[tuple[str, str, str]] = Counter()
        self._ready = asyncio.Event()

    def add(self, event: NetworkEvent) -> None:
        """Keep `event`, or count it as suppressed when over the rate. Never blocks."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            self._pending.append(event)
        else:
            self._suppressed[event.kind, event.decision, event.rule] += event.count
        self._ready.set()

    def take(self) -> list[NetworkEvent]:
        """What is waiting, without waiting: kept events, then one per suppressed kind."""
        batch, self._pending = self._pending, []
        batch += [
            NetworkEvent("suppressed", decision, rule, name=kind, count=count)
            for (kind, decision, rule), count in self._suppressed.items()
        ]
        self._suppressed.clear()
        self._ready.clear()
        return batch

    async def next_batch(self) -> list[NetworkEvent]:
        """Wait for events, then take them."""
        while not (self._pending or self._suppressed):
            await self._ready.wait()
            self._ready.clear()
        return self.take()


class Described(Protocol):
    """What `describe` reads: a NetworkEvent, a stored row, the SDK's event."""

    @property
    def kind(self) -> str: ...
    @property
    def decision(self) -> str: ...
    @property
    def rule(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def answers(self) -> Sequence[str]: ...
    @property
    def count(self) -> int: ...


def describe(event: Described) -> str:
    """The event in one line for people: "denied connect tcp 198.51.100.10:443 (rule: …)"."""
    if event.kind == "suppressed":
        return (
            f"{event.decision} {event.count} more {event.name or 'network'} events "
            f"(rate limited, not recorded one by one; rule: {event.rule})"
        )
    if event.kind == "dns":
        answer = ", ".join(event.answers) or "no answer"
        return f"{event.decision} dns {event.name} -> {answer} (rule: {event.rule})"
    host = f"[{event.address}]" if ":" in event.address else event.address
    where = f"{host}:{event.port}" if event.port else host
    return f"{event.decision} {event.kind} {event.protocol} {where} (rule: {event.rule})"
