"""A warm pool: sandboxes started ahead of demand, so Create costs a claim, not a launch.

The pool holds `size` sandboxes of one template and isolation tier, with default limits
and no environment. A claim takes one (O(1)) and wakes the filler, which starts a
replacement in the background. What a claim cannot change after start (storage size,
open files, file size) must be the defaults; memory, CPU and processes are applied by
the manager with `Engine.set_limits`, and environments are given per command.

Pooled sandboxes hold host memory like any other (the engine's admission counts them),
but they are spares: a real sandbox of this process that does not fit makes the engine
destroy them (a process can destroy only its own: another process's pool is not a spare
of this one), and a refill that does not fit is not an error, the pool just stays short
until there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from corral._aio import stop_tasks
from corral.errors import CapacityExceeded, CorralError
from corral.isolation import Engine, Limits, Sandbox, SandboxState
from corral.sandboxes import observe

log = logging.getLogger("corral.sandboxes")

_FIXED_LIMITS = ("disk_mib", "open_files", "file_size_mib")
_RETRY_MAX = 30.0
# How often a pool that the host has no room for looks again (admission costs nothing).
_FULL_RETRY = 1.0
# Pause between a claim and the refill it triggers (seconds).
_REFILL_DELAY = 0.05


class WarmPool:
    """Ready sandboxes of one (template, isolation); invisible to teams and their quotas."""

    def __init__(
        self,
        engine: Engine,
        size: int,
        template: str,
        isolation: str,
        *,
        may_fill: Callable[[], bool] | None = None,
        role: str = "sandboxes",
    ) -> None:
        self.engine = engine
        self.size = size
        self.template = template
        self.isolation = isolation
        # When given, the pool starts sandboxes only while this says so (and after
        # `wake`): a busy job worker keeps its CPU for the jobs it runs.
        self.may_fill = may_fill
        # Whose spares these are, for metrics: "sandboxes" (the API's) or "jobs".
        self.role = role
        self.backend: str | None = None  # resolved when the pool starts
        self._ready: deque[Sandbox] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.size > 0:
            self._task = asyncio.create_task(self._run(), name="corral-warm-pool")

    async def _run(self) -> None:
        try:
            # Probed off the event loop: a tier's first probe may take seconds.
            backend = await self.engine.load(self.isolation)
        except CorralError as exc:
            log.warning("no warm pool: %s", exc, extra={"template": self.template})
            return
        if self.template == "host" and not backend.host_template:
            # Else it would retry for ever: pools of layer templates are its warm pools.
            log.info(
                "no warm pool of the host template: the %s tier cannot run it",
                backend.name,
                extra={"template": self.template},
            )
            return
        self.backend = backend.name
        self.engine.add_spares(self)
        observe.pool_started(self)  # counted from here: its tier is known, it fills
        await self._fill()

    @property
    def ready(self) -> int:
        return len(self._ready)

    def fits(self, template: str, backend: str, limits: Limits) -> bool:
        """Whether a pooled sandbox can become one with these properties."""
        default = Limits()
        return (
            self.backend == backend
            and template == self.template
            and all(getattr(limits, n) == getattr(default, n) for n in _FIXED_LIMITS)
        )

    def claim(self) -> Sandbox | None:
        """A ready sandbox, now the caller's to destroy; None when the pool is empty."""
        while self._ready:
            sandbox = self._ready.popleft()
            self._wake.set()
            if sandbox.state is SandboxState.RUNNING:
                observe.pool_claimed(self, hit=True)
                return sandbox
        observe.pool_claimed(self, hit=False)
        return None

    def surrender(self) -> Sandbox | None:
        """The newest ready sandbox, for the engine to destroy to make room; no refill."""
        return self._ready.pop() if self._ready else None

    def spare_mib(self) -> int:
        return sum(s.spec.limits.memory_mib for s in self._ready)

    def wake(self) -> None:
        """Look again whether to fill (`may_fill` may have changed its mind)."""
        self._wake.set()

    def give_back(self, sandbox: Sandbox) -> None:
        """Return an unused claim (its limits untouched) to the front of the pool."""
        self._ready.appendleft(sandbox)

    async def _fill(self) -> None:
        delay = 0.5
        full = False  # the host had no room for the last refill
        while True:
            while len(self._ready) < self.size and (self.may_fill is None or self.may_fill()):
                try:
                    sandbox = await self.engine.create(
                        template=self.template, isolation=self.isolation, make_room=False
                    )
                except CapacityExceeded as exc:
                    if not full:
                        log.info("warm pool waits for room on the host: %s", exc)
                        full = True
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), _FULL_RETRY)
                    self._wake.clear()
                    continue
                except CorralError as exc:
                    log.warning(
                        "warm pool could not start a sandbox; retrying in %.1fs: %s",
                        delay,
                        exc,
                        extra={"template": self.template, "isolation": self.isolation},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
                    continue
                delay, full = 0.5, False
                self._ready.append(sandbox)
                log.debug(
                    "warm pool sandbox ready",
                    extra={
                        "sandbox_id": sandbox.id,
                        "isolation": self.backend,
                        "template": self.template,
                    },
                )
            self._wake.clear()
            await self._wake.wait()
            # Let the claimer's first command run before the refill competes with it for
            # the event loop and the CPU: launching a sandbox costs ~30 ms of both.
            await asyncio.sleep(_REFILL_DELAY)

    async def aclose(self) -> None:
        """Stop filling and destroy every ready sandbox."""
        await stop_tasks(self._task)
        observe.pool_closed(self)
        self.engine.remove_spares(self)
        ready, self._ready = list(self._ready), deque()
        await asyncio.gather(*(s.destroy() for s in ready), return_exceptions=True)
