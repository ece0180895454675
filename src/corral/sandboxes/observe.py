"""The sandbox service's Prometheus instruments, applied once where every caller passes:
`SandboxManager.create` and `SandboxCommands.exec` (whatever API called them: Connect,
E2B, envd), and the warm pools. The instruments are `corral.instruments`'.

    @observed_create
    async def create(self, team, options) -> SandboxRecord: ...
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from corral import instruments
from corral.errors import CorralError
from corral.guest import ExecResult

if TYPE_CHECKING:
    from corral.sandboxes.commands import ExecEvent, SandboxCommands
    from corral.sandboxes.manager import SandboxManager
    from corral.sandboxes.options import SandboxRecord
    from corral.sandboxes.pool import WarmPool

P = ParamSpec("P")


def failure_reason(exc: BaseException) -> str:
    """A failure as a label value: the error's class (a bounded set), never its message."""
    if isinstance(exc, CorralError):
        return type(exc).__name__
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "internal"


def how_created(reason: str) -> str:
    """How a sandbox started (cold, warm, restored, made), from its state reason."""
    from corral.sandboxes.manager import _CREATED

    for how, said in _CREATED.items():
        if reason == said:
            return how
    return "other"


def observed_create(
    create: Callable[Concatenate[SandboxManager, P], Coroutine[Any, Any, SandboxRecord]],
) -> Callable[Concatenate[SandboxManager, P], Coroutine[Any, Any, SandboxRecord]]:
    """Count and time `SandboxManager.create`: its successes by tier and how, its
    failures (refusals included) by reason."""

    @functools.wraps(create)
    async def observed(self: SandboxManager, /, *args: P.args, **kwargs: P.kwargs) -> SandboxRecord:
        started = time.perf_counter()
        try:
            record = await create(self, *args, **kwargs)
        except BaseException as exc:
            instruments.SANDBOX_CREATE_FAILURES.labels(reason=failure_reason(exc)).inc()
            raise
        labels = {"tier": record.isolation, "how": how_created(record.state_reason)}
        instruments.SANDBOX_CREATES.labels(**labels).inc()
        instruments.SANDBOX_CREATE_DURATION.labels(**labels).observe(time.perf_counter() - started)
        return record

    return observed


def observed_exec(
    exec_: Callable[Concatenate[SandboxCommands, P], AsyncGenerator[ExecEvent]],
) -> Callable[Concatenate[SandboxCommands, P], AsyncGenerator[ExecEvent]]:
    """Time `SandboxCommands.exec`: to its first event (the command runs) and to its end,
    by the sandbox's tier."""

    @functools.wraps(exec_)
    async def observed(
        self: SandboxCommands, /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncGenerator[ExecEvent]:
        started = time.perf_counter()
        sandbox_id = args[1] if len(args) > 1 else kwargs.get("sandbox_id")
        tier = "unknown"
        outcome = "abandoned"
        first = True
        stream = exec_(self, *args, **kwargs)
        try:
            async for event in stream:
                if first:
                    first = False
                    tier = _tier(self, sandbox_id)
                    instruments.EXEC_START.labels(tier=tier).observe(time.perf_counter() - started)
                if isinstance(event, ExecResult):
                    outcome = "exited"
                yield event
        except Exception:
            outcome = "error"
            raise
        finally:
            await stream.aclose()
            if first:
                tier = _tier(self, sandbox_id)
            instruments.EXEC_DURATION.labels(tier=tier, outcome=outcome).observe(
                time.perf_counter() - started
            )

    return observed


def _tier(commands: SandboxCommands, sandbox_id: object) -> str:
    """The tier of the live sandbox `sandbox_id` ("unknown": none, or not one yet)."""
    entry = commands._manager._live.get(sandbox_id) if isinstance(sandbox_id, str) else None
    return "unknown" if entry is None or entry.sandbox is None else entry.sandbox.backend


# -- warm pools ----------------------------------------------------------------------------

# The pools of this process that have started and not closed: their sizes are read when
# Prometheus scrapes, not kept up to date on every claim and refill.
_pools: weakref.WeakSet[WarmPool] = weakref.WeakSet()


def pool_started(pool: WarmPool) -> None:
    _pools.add(pool)


def pool_closed(pool: WarmPool) -> None:
    _pools.discard(pool)


def pool_claimed(pool: WarmPool, hit: bool) -> None:
    instruments.POOL_CLAIMS.labels(
        pool=pool.role,
        tier=pool.backend or pool.isolation,
        template=pool.template,
        result="hit" if hit else "miss",
    ).inc()


class PoolCollector(Collector):
    """`corral_warm_pool_ready` and `corral_warm_pool_size` of every pool of the process."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["pool", "tier", "template"]
        ready = GaugeMetricFamily(
            "corral_warm_pool_ready", "Sandboxes ready in the warm pool now.", labels=labels
        )
        size = GaugeMetricFamily(
            "corral_warm_pool_size",
            "Sandboxes the warm pool keeps ready when it can.",
            labels=labels,
        )
        totals: dict[tuple[str, str, str], tuple[int, int]] = {}
        for pool in list(_pools):
            key = (pool.role, pool.backend or pool.isolation, pool.template)
            was = totals.get(key, (0, 0))
            totals[key] = (was[0] + pool.ready, was[1] + pool.size)
        for key, (now, target) in sorted(totals.items()):
            ready.add_metric(list(key), now)
            size.add_metric(list(key), target)
        yield ready
        yield size


instruments.REGISTRY.register(PoolCollector())
