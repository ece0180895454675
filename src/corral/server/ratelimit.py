"""Rate limits per API key: requests per second and streams open at once.

Requests are counted by a token bucket per key: it holds up to `burst` tokens, refills at
`rate` a second, and each request takes one. An empty bucket refuses the request with
`RateLimited`, whose `retry_after` is when the next token comes (the Connect API answers
RESOURCE_EXHAUSTED with the seconds in its `ErrorDetail` and a Retry-After header; E2B's
REST API 429 with Retry-After). Streams (server- and client-streaming RPCs: exec,
attach, file transfers, log and event follows) count while they are open: one past
`streams` is refused until one ends.

The counts live in this process (keys are the sha256 of the API key, never the key).
Limits are per server process: a fleet of servers behind a balancer grants each its own.
A value of 0 turns that limit off.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from connectrpc.request import RequestContext

from corral.errors import RateLimited
from corral.server.auth import caller

if TYPE_CHECKING:
    from corral.store import Team

REQ = TypeVar("REQ")
RES = TypeVar("RES")

# A refused stream is told to try again after this: when a stream ends is not known.
STREAM_RETRY_SECONDS = 1.0
# Keys tracked at most; past it, keys whose bucket is full and that have no stream open
# (they would start over exactly as they are) are forgotten.
MAX_KEYS = 10_000


@dataclass
class _Usage:
    tokens: float
    at: float  # when `tokens` was counted (the clock's seconds)
    rate: float  # the key's limits when last counted (its team's may differ)
    burst: int
    streams: int = 0

    def refill(self, now: float) -> None:
        if self.rate > 0:
            self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now


@dataclass(frozen=True)
class _Limits:
    rate: float
    burst: int
    streams: int
    # Where they come from, for the refusal's message.
    rate_source: str = "the server's CORRAL_API_RATE and CORRAL_API_BURST"
    streams_source: str = "the server's CORRAL_API_STREAMS"


def retry_headers(exc: Exception) -> dict[str, str]:
    """The Retry-After header of a RateLimited refusal (whole seconds, rounded up, as
    HTTP has it); none for other errors."""
    if isinstance(exc, RateLimited):
        return {"retry-after": str(max(1, math.ceil(exc.retry_after)))}
    return {}


class RateLimits:
    """The request rate and open streams of each API key, against the server's limits
    (`Settings.api_rate`, `api_burst`, `api_streams`, checked there; 0: no limit) or its
    team's own (`Team.max_api_rate`, bursts of twice that, and `max_api_streams`)."""

    def __init__(
        self,
        rate: float = 0.0,
        burst: int = 0,
        streams: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.streams = streams
        self._clock = clock
        self._usage: dict[str, _Usage] = {}

    def _limits(self, team: Team | None) -> _Limits:
        limits = _Limits(self.rate, self.burst, self.streams)
        if team is not None and team.max_api_rate > 0:
            burst = max(1, math.ceil(2 * team.max_api_rate))
            limits = replace(
                limits, rate=team.max_api_rate, burst=burst, rate_source="the team's max_api_rate"
            )
        if team is not None and team.max_api_streams > 0:
            limits = replace(
                limits,
                streams=team.max_api_streams,
                streams_source="the team's max_api_streams",
            )
        return limits

    def _of(self, key: str, limits: _Limits) -> _Usage:
        now = self._clock()
        usage = self._usage.get(key)
        if usage is None:
            if len(self._usage) >= MAX_KEYS:
                self._forget_idle(now)
            usage = self._usage[key] = _Usage(float(limits.burst), now, limits.rate, limits.burst)
        usage.refill(now)
        usage.rate, usage.burst = limits.rate, limits.burst
        usage.tokens = min(usage.tokens, float(limits.burst))
        return usage

    def _forget_idle(self, now: float) -> None:
        def idle(usage: _Usage) -> bool:
            usage.refill(now)
            return (usage.rate <= 0 or usage.tokens >= usage.burst) and usage.streams == 0

        self._usage = {key: usage for key, usage in self._usage.items() if not idle(usage)}

    def take_caller(self) -> None:
        """`take` for the key the request being handled was authenticated with."""
        found = caller()
        if found is not None:
            self.take(*found)

    def take(self, key: str, team: Team | None = None) -> None:
        """Count one request of `key` (of `team`), or refuse it (RateLimited) when its
        bucket is empty."""
        limits = self._limits(team)
        if limits.rate <= 0:
            return
        usage = self._of(key, limits)
        if usage.tokens < 1:
            wait = (1 - usage.tokens) / limits.rate
            raise RateLimited(
                f"too many requests with this API key: {limits.rate:g} a second are allowed "
                f"(bursts of {limits.burst}; {limits.rate_source}); try again "
                f"in {wait:.2f} s",
                retry_after=wait,
            )
        usage.tokens -= 1

    def open_stream(self, key: str, team: Team | None = None) -> None:
        """Count a stream of `key` (of `team`) as open, or refuse it (RateLimited) at the
        limit; the caller calls `close_stream` when it ends."""
        limits = self._limits(team)
        usage = self._of(key, limits)
        if limits.streams > 0 and usage.streams >= limits.streams:
            raise RateLimited(
                f"this API key has {usage.streams} streams open (exec, attach, file "
                f"transfers, log follows) and {limits.streams} are allowed at once "
                f"({limits.streams_source}); end one, or try again later",
                retry_after=STREAM_RETRY_SECONDS,
            )
        usage.streams += 1

    def close_stream(self, key: str) -> None:
        usage = self._usage.get(key)
        if usage is not None and usage.streams > 0:
            usage.streams -= 1

    def open_streams(self, key: str) -> int:
        usage = self._usage.get(key)
        return 0 if usage is None else usage.streams


class StreamLimitInterceptor:
    """Counts each streaming RPC against its caller's key while it is open (the app has
    authenticated the caller before: `auth.caller`). Listed after `ErrorInterceptor`,
    so its refusal leaves as RESOURCE_EXHAUSTED like any Corral error."""

    def __init__(self, limits: RateLimits) -> None:
        self._limits = limits

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[RES]:
        found = caller()
        if found is None:
            async for message in call_next(request, ctx):
                yield message
            return
        key, team = found
        self._limits.open_stream(key, team)
        try:
            async for message in call_next(request, ctx):
                yield message
        finally:
            self._limits.close_stream(key)

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[REQ], RequestContext[Any, Any]], Awaitable[RES]],
        request: AsyncIterator[REQ],
        ctx: RequestContext[Any, Any],
    ) -> RES:
        found = caller()
        if found is None:
            return await call_next(request, ctx)
        key, team = found
        self._limits.open_stream(key, team)
        try:
            return await call_next(request, ctx)
        finally:
            self._limits.close_stream(key)
