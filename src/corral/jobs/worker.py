"""A worker: claims queued jobs under a lease, runs each in a fresh sandbox, ends them.

    worker = Worker(settings, store, engine=engine, concurrency=4)
    await worker.start()        # claim loop, heartbeats, lease expiry
    ...
    await worker.aclose()       # running jobs are stopped and queued again

A worker renews the lease of its running jobs every third of the lease. A worker that
stops (SIGKILL, machine gone) stops renewing; any worker then finds the expired lease
and queues the job again, or marks it lost when it has lost `MAX_LOST` workers. So a job
runs at least once, and may run more than once: jobs should be safe to repeat.

Many workers may share a store (`corral server` runs one in-process, `corral worker`
runs more); each claims only jobs whose isolation it can give, and the store shares
free slots between teams (`JobStore.claim_jobs`): a team's priorities order only its
own jobs, and it runs at most its `max_running_jobs` at once.

A worker claims only jobs that fit the host's free memory (`Engine.free_memory_mib`, less
what the jobs it claimed and has not yet given a sandbox will take), so a job waiting for
room stays queued. Should the host still refuse its sandbox (`CapacityExceeded`: another
process took the room meanwhile), the job is given back to the queue unspent and claimed
again when one of this worker's jobs ends, or a little later (`ROOM_WAIT_SECONDS`,
growing); one that could never fit the host fails at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from corral import instruments, logs, tracing
from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.isolation import Engine
from corral.isolation.footprint import process_start_time
from corral.job_lifecycle import MAX_LOST, retries, retry_delay, room_wait
from corral.jobs.build import BuildRunner
from corral.jobs.queue import JobSignals, never_fits
from corral.jobs.runner import AttemptRunner, Outcome, Policy, Stop
from corral.jobs.sandbox import JobSandboxes
from corral.jobs.spec import BUILD_KIND, JobSpec
from corral.sandboxes.pool import WarmPool
from corral.sandboxes.volumes import Volumes
from corral.store import Store
from corral.store.job_rows import Attempt, JobRow
from corral.templates import TemplateCatalog

R = TypeVar("R")

log = logging.getLogger("corral.jobs")

SHUT_DOWN = "requeued: its worker shut down"


def worker_name() -> str:
    """host:pid:start-time — enough for a worker on the same host to tell whether the
    worker of a running job is still alive."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start_time(pid) or 0}"


def _dead_local_worker(name: str) -> bool:
    host, _, rest = name.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    return str(process_start_time(int(pid_text)) or "") != start


class Worker:
    """Runs up to `concurrency` jobs at once from the store's queue. A job's slot takes
    the next job once its last command is over, while its sandbox is destroyed."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        engine: Engine,
        signals: JobSignals | None = None,
        concurrency: int | None = None,
        policy: Policy | None = None,
        lease: float | None = None,
        poll: float | None = None,
        pool_size: int | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.signals = signals or JobSignals()
        self.concurrency = settings.job_workers if concurrency is None else concurrency
        self.policy = policy or Policy(
            isolation=settings.default_isolation,
            timeout=settings.job_timeout,
            log_limit=settings.job_log_limit,
        )
        self.lease = float(lease or settings.job_lease)
        # Between claims when nothing wakes the worker; None: its signals' (short on
        # SQLite, a slow safety net where other processes' changes wake it).
        self.poll = poll
        self.name = worker_name()
        # Warm sandboxes give the lowest latency, one-shot ones the lowest cost: a job takes
        # a warm one when one is ready, and the pool refills only while the worker is idle
        # (`_idle`), so a busy worker runs one-shot sandboxes and spends nothing on refills.
        self.pool = WarmPool(
            engine,
            min(settings.job_pool, self.concurrency) if pool_size is None else pool_size,
            self.policy.template,
            self.policy.isolation,
            may_fill=self._idle,
            role="jobs",
        )
        self.sandboxes = JobSandboxes(engine, self.pool)
        self.volumes = Volumes(settings, store)
        # The isolation names this worker can give, once its tiers are probed (`tiers`).
        self.isolations: tuple[str, ...] | None = None
        # The jobs that hold a slot, and those that gave theirs up as their commands ended
        # and whose sandbox is being destroyed (`_release`).
        self._running: dict[str, Stop] = {}
        self._tearing_down: set[str] = set()
        # Jobs this worker sent back to wait for room, oldest first (see `_wait_for_room`).
        self._waiting_for_room: dict[str, None] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._runs: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._closing = False
        # Whether the last claim found fewer jobs than it had slots for: the queue has
        # nothing more for this worker now.
        self._drained = True
        # Where `template=NAME` resolves and builds run (set by the jobs runtime); None:
        # only `host`, no builds.
        self.templates: TemplateCatalog | None = None

    async def tiers(self) -> tuple[str, ...]:
        """The isolation names this worker can give: "auto" and each usable tier. Probed
        off the event loop on first use (a tier's probe may take seconds), not when the
        worker is made: the server answers requests meanwhile."""
        if self.isolations is None:
            names = ["auto"]
            for name, caps in (await self.engine.load_capabilities()).items():
                if caps.available and (name != "process" or self.settings.allow_process_backend):
                    names.append(name)
            self.isolations = tuple(names)
        return self.isolations

    # -- process lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        for name in self.store.running_workers():
            if name and name != self.name and _dead_local_worker(name):
                log.warning("requeueing the jobs of a dead worker", extra={"worker": name})
                self.store.expire_worker(name)
        self._expire()
        if self.concurrency > 0:
            self.pool.start()
            self._tasks.append(asyncio.create_task(self._claim_loop(), name="job-claims"))
            self._tasks.append(asyncio.create_task(self._heartbeats(), name="job-heartbeats"))
        self._tasks.append(asyncio.create_task(self._expiry_loop(), name="job-leases"))
        log.info(
            "job worker started",
            extra={"worker": self.name, "concurrency": self.concurrency},
        )

    async def aclose(self) -> None:
        """Stop claiming; stop the running jobs and give them back to the queue."""
        self._closing = True
        await stop_tasks(*self._tasks)
        self._tasks = []
        for stop in self._running.values():
            stop.set("shutdown")
        if self._runs:
            await asyncio.gather(*self._runs, return_exceptions=True)
        await self.pool.aclose()

    @property
    def running(self) -> int:
        return len(self._running)

    def _idle(self) -> bool:
        """Whether a refill of the pool takes nothing from the jobs: a slot is free and
        the queue had no job for it. (A slot is free for a moment after each job while a
        busy worker claims the next; a refill started then would compete with that job.)"""
        return not self._closing and len(self._running) < self.concurrency and self._drained

    # -- loops --------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        isolations = await self.tiers()
        while True:
            free = self.concurrency - len(self._running)
            if free == 0:  # only a run's end frees a slot, and it wakes this loop
                await self._sleep(self._poll())
                continue
            claimed: list[JobRow] = []
            try:
                claimed = await self._claim(isolations, free)
            except Exception:
                log.exception("claiming jobs failed; trying again")
            for row in claimed:
                self._start_run(row)
            drained = len(claimed) < free
            if drained and not self._drained:
                self.pool.wake()  # idle now: the pool may refill
            self._drained = drained
            if not drained:
                await asyncio.sleep(0)  # let the runs start before claiming more
                continue
            await self._sleep(await self._until_next_claim(isolations))

    async def _off_loop(self, call: Callable[[], R]) -> R:
        """`call` (a store call) in a thread when the store is a database server: its
        round trips would otherwise stall every running job's output and end. On SQLite,
        here: its calls are work in this process that a thread would only slow."""
        if not self.store.networked:
            return call()
        return await asyncio.to_thread(call)

    async def _claim(self, isolations: tuple[str, ...], free: int) -> list[JobRow]:
        """Claim up to `free` jobs, off the event loop (`_off_loop`). Should the worker stop
        meanwhile, the claim still completes and its jobs start, to be given back by the
        shutdown like any running job (never left claimed by no one until the lease ends)."""
        claiming = asyncio.ensure_future(
            self._off_loop(
                functools.partial(
                    self.store.claim_jobs,
                    self.name,
                    isolations,
                    free,
                    self.lease,
                    room_mib=self.sandboxes.free_memory_mib(),
                    capacity_mib=self.engine.memory_capacity.mib,
                )
            )
        )
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                for row in await claiming:
                    self._start_run(row)
            raise

    async def _until_next_claim(self, isolations: tuple[str, ...]) -> float:
        """The poll, or less when a queued job comes due sooner (a retry's backoff, a
        wait for room): nothing notifies that moment. Read off the event loop, as the claim."""
        poll = self._poll()
        try:
            due = await self._off_loop(functools.partial(self.store.next_run_after, isolations))
        except Exception:
            log.exception("reading when the next job is due failed")
            return min(poll, 1.0)
        if due is None:
            return poll
        return max(0.0, min(poll, (due - datetime.now(UTC)).total_seconds()))

    def _poll(self) -> float:
        return self.signals.poll if self.poll is None else self.poll

    async def _sleep(self, seconds: float) -> None:
        """Until a job is queued in this process, a run ends, or `seconds` pass."""
        queued = asyncio.ensure_future(self.signals.wait_queued(seconds))
        ended = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((queued, ended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            queued.cancel()
            ended.cancel()
        self._wake.clear()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                stops = self.store.heartbeat(self.name, list(self._running), self.lease)
            except Exception:
                log.exception("heartbeat failed; trying again")
                continue
            for job_id, why in stops.items():
                stop = self._running.get(job_id)
                if stop is not None:
                    stop.set(why)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.lease / 3))
            try:
                self._expire()
            except Exception:
                log.exception("expiring leases failed; trying again")

    def _expire(self) -> None:
        for row in self.store.expire_leases(MAX_LOST):
            log.warning(
                "job's worker stopped heartbeating",
                extra={"job_id": row.id, "state": row.state, "reason": row.state_reason},
            )
            self.signals.changed(row.id)
            if not row.final:  # queued again
                self.signals.queued()

    # -- one job ------------------------------------------------------------------------

    def _start_run(self, row: JobRow) -> None:
        self._waiting_for_room.pop(row.id, None)
        self.sandboxes.claimed(row.id, row.memory_mib)
        stop = Stop()
        self._running[row.id] = stop
        self.signals.cancels[row.id] = lambda: stop.set("cancel")
        task = asyncio.create_task(self._run(row, stop), name=f"job-{row.id}")
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _run(self, row: JobRow, stop: Stop) -> None:
        logs.start(job_id=row.id, team_id=row.team_id)  # this task runs this job only
        # Each attempt a child of the span that submitted the job (see tracing.resumed).
        job: tracing.Attributes = {
            "corral.job.id": row.id,
            "corral.job.kind": row.kind,
            "corral.job.attempt": row.attempt,
        }
        with tracing.span("job.run", job, parent=tracing.resumed(row.traceparent)):
            await self._attempt(row, stop)

    async def _attempt(self, row: JobRow, stop: Stop) -> None:
        attempt = Attempt(row.id, self.name, row.attempt)
        self.signals.changed(row.id)
        began = time.perf_counter()
        freed = False  # whether the attempt had (or may have had) a sandbox, now gone
        try:
            if row.cancel_reason is not None:  # canceled between the claim and now
                stop.set("cancel")
            spec = JobSpec.from_dict(row.spec)
            runner: AttemptRunner | BuildRunner
            if spec.kind == BUILD_KIND:
                if self.templates is None:
                    raise InvalidRequest("this worker has no template catalog to build with")
                self.sandboxes.forget(row.id)  # the builder's sandboxes are admitted as made
                runner = BuildRunner(
                    self.store, self.signals, self.policy, attempt, spec, self.templates, stop
                )
            else:
                if spec.template and self.templates is not None:
                    # The team's template of that name (TemplateNotFound when gone since).
                    spec = replace(
                        spec, template=self.templates.resolve(row.team_id, spec.template)
                    )
                runner = AttemptRunner(
                    self.store,
                    self.signals,
                    self.policy,
                    attempt,
                    spec,
                    self.sandboxes,
                    stop,
                    functools.partial(self.volumes.mounts, row.team_id),
                    commands_over=functools.partial(self._release, row.id),
                )
            outcome = await runner.run()
            _observe_attempt(spec.kind, outcome.state, time.perf_counter() - began)
            freed = outcome.state != "no_room"
            # Its sandbox is gone: the next job may start while this one's end is written.
            self._vacate(row.id, freed)
            await self._end(row, spec, attempt, outcome)
        except Exception as exc:
            _observe_attempt(str(row.spec.get("kind", "")), "error", time.perf_counter() - began)
            log.exception("running a job failed", extra={"job_id": row.id})
            with contextlib.suppress(Exception):
                self.store.end_attempt(attempt, "failed", f"failed: {exc}", exit_code=None)
        finally:
            self._vacate(row.id, freed)
            self.signals.changed(row.id)
            # Again now that its end is written, if a slot is still free: a claim made
            # meanwhile found the job still running, which may have held its team at its
            # max_running_jobs. (With every slot taken, the next end wakes the claims.)
            if len(self._running) < self.concurrency:
                self._wake.set()

    def _release(self, job_id: str) -> None:
        """The attempt's commands are over: its slot takes the next job while its sandbox
        is destroyed (the sandbox's memory stays counted by the engine until it is gone,
        and `_vacate` then wakes the claims again)."""
        if self._running.pop(job_id, None) is None:
            return
        self._tearing_down.add(job_id)
        self.signals.cancels.pop(job_id, None)  # nothing is left to cancel
        self._wake.set()

    def _vacate(self, job_id: str, freed: bool) -> None:
        """Give up the attempt's slot, if it still holds one, and memory (once): it has no
        sandbox any more, or (`freed`) may have had one that is gone now."""
        held = self._running.pop(job_id, None) is not None
        torn_down = job_id in self._tearing_down
        self._tearing_down.discard(job_id)
        if not (held or torn_down):
            return
        self.sandboxes.forget(job_id)
        self.signals.cancels.pop(job_id, None)
        if freed:
            self._room_freed()
        self._wake.set()
        self.pool.wake()

    async def _end(self, row: JobRow, spec: JobSpec, attempt: Attempt, outcome: Outcome) -> None:
        tracing.annotate({"corral.job.outcome": outcome.state})
        if outcome.state == "lost":
            log.warning("job lost its lease mid-run; left to the queue", extra={"job_id": row.id})
            return
        if outcome.state == "shutdown":
            self.store.release_attempt(attempt, SHUT_DOWN)
            return
        if outcome.state == "no_room":
            self._wait_for_room(row, spec, attempt, outcome.reason)
            return
        retry_at = None
        if retries(outcome.state, row.attempt, row.max_attempts):
            delay = retry_delay(spec.retry_backoff, row.attempt)
            retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        # Off the event loop, as the claim: the other jobs' output and ends go on meanwhile.
        await self._off_loop(
            functools.partial(
                self.store.end_attempt,
                attempt,
                outcome.state,
                outcome.reason,
                exit_code=outcome.exit_code,
                retry_at=retry_at,
            )
        )
        log.info(
            "job attempt ended",
            extra={"job_id": row.id, "state": outcome.state, "attempt": row.attempt},
        )

    def _wait_for_room(self, row: JobRow, spec: JobSpec, attempt: Attempt, why: str) -> None:
        """The host refused the job's sandbox (`why`): back to the queue for a later try,
        neither a retry nor a lost worker spent; or, when it could never fit, failed now."""
        memory_mib = self.policy.limits_for(spec).memory_mib
        capacity = self.engine.memory_capacity
        if never_fits(memory_mib, capacity) is not None:
            self.store.end_attempt(attempt, "failed", f"failed: {why}", exit_code=None)
            return
        waits = self.store.count_events(row.id, "requeued")
        delay = room_wait(waits)
        run_after = datetime.now(UTC) + timedelta(seconds=delay)
        log.info(
            "job waits for host memory",
            extra={"job_id": row.id, "memory_mib": memory_mib, "delay": delay},
        )
        released = self.store.release_attempt(
            attempt,
            f"waiting for host memory (tried again within {delay:g} s): {why}",
            started=False,
            run_after=run_after,
            data={
                "memory_mib": memory_mib,
                "capacity_mib": capacity.mib,
                "waits": waits + 1,
                "run_after": run_after.isoformat(),
            },
        )
        if released is not None and not released.final:
            self._waiting_for_room[row.id] = None

    def _room_freed(self) -> None:
        """A job's sandbox is gone: the oldest job this worker sent to wait for room may
        take it now rather than at its run_after. One per freed sandbox, so a full host
        costs one extra claim per job that ends, never a claim of every waiting job."""
        job_id = next(iter(self._waiting_for_room), None)
        if job_id is None:
            return
        del self._waiting_for_room[job_id]
        try:
            self.store.make_due(job_id)
        except Exception:  # it is claimed at its run_after instead
            log.exception("waking a job that waits for room failed", extra={"job_id": job_id})


def _observe_attempt(kind: str, outcome: str, seconds: float) -> None:
    """Count and time a job attempt that ended (`outcome`: its state, or "error" when
    running it failed)."""
    instruments.JOB_ATTEMPTS.labels(kind=kind, outcome=outcome).inc()
    instruments.JOB_DURATION.labels(kind=kind, outcome=outcome).observe(seconds)
