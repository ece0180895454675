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
from dataclasses import dataclass
from typing import Any, TypeVar

from connectrpc.request import RequestContext

from corral.errors import RateLimited
from corral.server.auth import caller_key

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
    streams: int = 0


def retry_headers(exc: Exception) -> dict[str, str]:
    """The Retry-After header of a RateLimited refusal (whole seconds, rounded up, as
    HTTP has it); none for other errors."""
    if isinstance(exc, RateLimited):
        return {"retry-after": str(max(1, math.ceil(exc.retry_after)))}
    return {}


class RateLimits:
    """The request rate and open streams of each API key, against the server's limits
    (`Settings.api_rate`, `api_burst`, `api_streams`, checked there; 0: no limit)."""

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

    def _of(self, key: str, now: float) -> _Usage:
        usage = self._usage.get(key)
        if usage is None:
            if len(self._usage) >= MAX_KEYS:
                self._forget_idle(now)
            usage = self._usage[key] = _Usage(float(self.burst), now)
        elif self.rate > 0:
            usage.tokens = min(float(self.burst), usage.tokens + (now - usage.at) * self.rate)
            usage.at = now
        return usage

    def _forget_idle(self, now: float) -> None:
        def idle(usage: _Usage) -> bool:
            full = self.rate <= 0 or usage.tokens + (now - usage.at) * self.rate >= self.burst
            return full and usage.streams == 0

        self._usage = {key: usage for key, usage in self._usage.items() if not idle(usage)}

    def take_caller(self) -> None:
        """`take` for the key the request being handled was authenticated with."""
        key = caller_key()
        if key is not None:
            self.take(key)

    def take(self, key: str) -> None:
        """Count one request of `key`, or refuse it (RateLimited) when its bucket is empty."""
        if self.rate <= 0:
            return
        usage = self._of(key, self._clock())
        if usage.tokens < 1:
            wait = (1 - usage.tokens) / self.rate
            raise RateLimited(
                f"too many requests with this API key: the server allows {self.rate:g} a "
                f"second (bursts of {self.burst}, CORRAL_API_RATE and CORRAL_API_BURST); "
                f"try again in {wait:.2f} s",
                retry_after=wait,
            )
        usage.tokens -= 1

    def open_stream(self, key: str) -> None:
        """Count a stream of `key` as open, or refuse it (RateLimited) at the limit; the
        caller calls `close_stream` when it ends."""
        usage = self._of(key, self._clock())
        if self.streams > 0 and usage.streams >= self.streams:
            raise RateLimited(
                f"this API key has {usage.streams} streams open (exec, attach, file "
                f"transfers, log follows) and the server allows {self.streams} at once "
                "(CORRAL_API_STREAMS); end one, or try again later",
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
    authenticated the caller before: `auth.caller_key`). Listed after `ErrorInterceptor`,
    so its refusal leaves as RESOURCE_EXHAUSTED like any Corral error."""

    def __init__(self, limits: RateLimits) -> None:
        self._limits = limits

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[RES]:
        key = caller_key()
        if key is None:
            async for message in call_next(request, ctx):
                yield message
            return
        self._limits.open_stream(key)
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
        key = caller_key()
        if key is None:
            return await call_next(request, ctx)
        self._limits.open_stream(key)
        try:
            return await call_next(request, ctx)
        finally:
            self._limits.close_stream(key)
