"""The job service: submit, read, cancel and retry a team's jobs; follow their output.

    queue = JobQueue(store, settings, signals=signals, isolations=worker.tiers)
    job, created, secret = await queue.submit(team, JobSpec.from_dict(data), idempotency_key="k1")
    async for chunks in queue.follow_logs(team, job.id, offset=0, follow=True): ...

Everything a reader sees comes from the store, so a reader never sees output that a
crash could take back. Readers in the process that runs the job are woken at once
(`JobSignals`); readers of jobs that other processes run are woken by the store's
notifications on PostgreSQL (`corral.store.notifications`), and poll the store on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from corral import tracing
from corral.config import Settings
from corral.errors import CapacityExceeded, InvalidRequest, IsolationUnavailable, NotFound
from corral.isolation import registry
from corral.isolation.admission import MemoryCapacity
from corral.isolation.templates import get_template
from corral.job_lifecycle import may_retry_by_request
from corral.jobs.callback_policy import CallbackPolicy
from corral.jobs.records import JobRecord
from corral.jobs.spec import BUILD_KIND, JobSpec, check_labels
from corral.limits import Limits
from corral.sandboxes.volumes import Volumes
from corral.states import JOB_STATES
from corral.store import Store, Team
from corral.store.job_logs import LogChunkRow
from corral.store.job_rows import JOB_CANCELED, JOB_CHANGED, JOBS_QUEUED, JobEventRow, JobRow
from corral.store.notifications import RECHECK, SAFETY_POLL_SECONDS, Notifications
from corral.store.pages import check_page_size
from corral.store.teams import check_totals
from corral.templates import TemplateCatalog
from corral.templates.defaults import SandboxDefaults

T = TypeVar("T", LogChunkRow, JobEventRow)


class _Reader(Protocol[T]):
    def __call__(self, job_id: str, offset: int) -> list[T]: ...


# How often a follower or a worker re-reads the store when nothing can wake it (the job
# runs, or is queued, in another process, on SQLite), and how many rows (and bytes of
# logs) one read returns.
POLL_SECONDS = 0.25
PAGE_ROWS = 500
PAGE_BYTES = 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255


class JobSignals:
    """Wake-ups of the API's followers and the workers: from this process directly, and
    from other processes through the store's notifications once `listen`ing."""

    def __init__(self) -> None:
        self._queued = asyncio.Event()
        self._changed: dict[str, asyncio.Event] = {}
        # Running jobs of this process's workers: what stops each at once on a cancel.
        self.cancels: dict[str, Callable[[], None]] = {}
        # How long a waiter sleeps before it reads the store again regardless.
        self.poll = POLL_SECONDS

    def listen(self, notifications: Notifications) -> Callable[[], None]:
        """Wake on the changes other processes commit too; returns the call that stops.
        Where they do wake us (PostgreSQL), polling is only a slow safety net."""
        if notifications.cross_process:
            self.poll = SAFETY_POLL_SECONDS
        return notifications.subscribe(self._heard)

    def _heard(self, channel: str, payload: str) -> None:
        if channel == JOBS_QUEUED:
            self.queued()
        elif channel == JOB_CHANGED:
            self.changed(payload)
        elif channel == JOB_CANCELED:
            self.cancel(payload)
        elif channel == RECHECK:
            # Changes may have gone unheard: every waiter reads the store again (a cancel
            # missed meanwhile reaches its worker at the next heartbeat).
            self.queued()
            for job_id in list(self._changed):
                self.changed(job_id)

    def queued(self) -> None:
        """A job was queued: wake the workers."""
        self._queued.set()

    async def wait_queued(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queued.wait(), timeout)
        self._queued.clear()

    def watch(self, job_id: str) -> asyncio.Event:
        """An event set at the job's next change; take it *before* reading the store, so
        a change between the read and the wait is not missed."""
        return self._changed.setdefault(job_id, asyncio.Event())

    def changed(self, job_id: str) -> None:
        """The job has new output, events or state."""
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    def cancel(self, job_id: str) -> None:
        stop = self.cancels.get(job_id)
        if stop is not None:
            stop()


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} days" if seconds > 86400 else "1 day"
    return f"{seconds} s"


def never_fits(memory_mib: int, capacity: MemoryCapacity) -> CapacityExceeded | None:
    """The error for a job whose sandbox needs more memory than the host's whole capacity:
    unlike a full host, which frees room as sandboxes end, waiting would never help."""
    if memory_mib <= capacity.mib:
        return None
    return CapacityExceeded(
        f"the job's sandbox asks for memory_mib={memory_mib}, more than this host can ever "
        f"give sandboxes ({capacity.describe()}), so it could never start here: ask for at "
        f"most {capacity.mib} MiB, or (knowing the risk: no swap) raise "
        "CORRAL_MEMORY_OVERCOMMIT or lower CORRAL_MEMORY_RESERVE_MIB"
    )


def with_defaults(spec: JobSpec, defaults: SandboxDefaults) -> JobSpec:
    """`spec` with its template's defaults in what it leaves unset (each limit, and a
    network when it names none), so the stored spec says what every attempt gets."""
    limits = {**defaults.limits, **spec.limits}
    if spec.network is not None or defaults.network is None:
        return replace(spec, limits=limits)
    network = defaults.network
    return replace(spec, limits=limits, network=network.mode, network_allow=network.entries)


def new_job_id() -> str:
    return "j" + secrets.token_hex(10)


class JobQueue:
    """A team's view of the queue: every call checks the job is the team's."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        signals: JobSignals | None = None,
        isolations: Callable[[], Awaitable[Sequence[str]]] | None = None,
        callback_policy: CallbackPolicy | None = None,
        capacity: MemoryCapacity | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        # Which callback URLs Submit accepts (the dispatcher checks them again).
        self.callback_policy = callback_policy or CallbackPolicy.parse(settings.callback_allow)
        # What the team's jobs may reach (each worker may allow less: `Policy.network`).
        self.network_cap = settings.network_cap()
        self.signals = signals or JobSignals()
        # What this process's workers can give; None: no workers here, any tier is
        # accepted for workers elsewhere.
        self.isolations = isolations
        # The memory this process's workers' host can give sandboxes; None: no workers
        # here (workers elsewhere may run on larger hosts, and refuse what never fits).
        self.capacity = capacity
        # The template catalog `template=NAME` resolves in (set by the jobs runtime);
        # None: only `host`.
        self.templates: TemplateCatalog | None = None

    # -- requests -----------------------------------------------------------------------

    async def submit(
        self, team: Team, spec: JobSpec, idempotency_key: str = ""
    ) -> tuple[JobRecord, bool, str]:
        """Queue a job: (the job, whether this call created it, its callback secret)."""
        if spec.kind == BUILD_KIND:
            raise InvalidRequest(
                "a build job is started by `corral template build` (TemplateService.Build), "
                "not submitted as a job"
            )
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY or "\0" in idempotency_key:
            raise InvalidRequest(
                f"idempotency_key is {len(idempotency_key)} characters; "
                f"use at most {MAX_IDEMPOTENCY_KEY} printable ones"
            )
        template = spec.template or "host"
        if self.templates is not None:
            self.templates.resolve(team.id, template)  # TemplateNotFound: not the team's
            spec = with_defaults(spec, self.templates.defaults(team.id, template))
        else:
            get_template(template)
        limits = Limits(**{**asdict(Limits()), **spec.limits})
        check_totals(team, asdict(limits))  # the job's sandbox alone must fit the quotas
        limits.check_host()
        if self.capacity is not None and (error := never_fits(limits.memory_mib, self.capacity)):
            raise error
        isolation = spec.isolation or "auto"
        given = None if self.isolations is None else await self.isolations()
        if given is not None and isolation not in given:
            # Probed in a thread: a tier's first probe may take seconds.
            reason = await asyncio.to_thread(registry.unavailable, isolation, self.settings)
            raise IsolationUnavailable(
                f"isolation {isolation!r} is not available on this server's workers "
                f"(they give {', '.join(given)})"
                + (f": {reason}" if reason else "")
                + "; run `corral doctor` to see what is missing, or submit with another "
                "isolation"
            )
        self.network_cap.check(spec.network_policy, team.name)
        # The team's volumes at valid paths, or refused now rather than at each attempt.
        Volumes(self.settings, self.store).mounts(team.id, spec.volumes)
        if spec.callback_url:
            await self.callback_policy.check(spec.callback_url)  # CallbackRefused names the rule
        now = datetime.now(UTC)
        secret = secrets.token_hex(32) if spec.callback_url else None
        row = JobRow.queued(
            id=new_job_id(),
            team_id=team.id,
            idempotency_key=idempotency_key or None,
            kind=spec.kind,
            template=template,
            isolation=isolation,
            memory_mib=limits.memory_mib,
            spec=spec.to_dict(),
            labels=dict(spec.labels),
            priority=spec.priority,
            max_attempts=spec.max_attempts,
            callback_url=spec.callback_url,
            callback_secret=secret,
            now=now,
            traceparent=tracing.traceparent(),  # the request's span: its runs' parent
        )
        stored, created = self.store.insert_job(row)
        tracing.annotate({"corral.job.id": stored.id})
        if created:
            self.signals.queued()
        return self._record(stored), created, (secret or "") if created else ""

    async def submit_build(self, team_id: str, template_id: str, name: str) -> str:
        """Queue the build job of the template row `template_id` (the template catalog's
        call); the job's id. Its sandboxes are the builder's own, started per step."""
        spec = JobSpec(
            kind=BUILD_KIND,
            build=template_id,
            timeout=self.settings.build_timeout,
            labels={"template": name},
        )
        row = JobRow.queued(
            id=new_job_id(),
            team_id=team_id,
            idempotency_key=None,
            kind=BUILD_KIND,
            template=name,
            isolation="auto",
            memory_mib=Limits().memory_mib,
            spec=spec.to_dict(),
            labels=dict(spec.labels),
            priority=0,
            max_attempts=1,
            callback_url=None,
            callback_secret=None,
            now=datetime.now(UTC),
            traceparent=tracing.traceparent(),  # the build's request, if any
        )
        stored, _ = self.store.insert_job(row)
        self.signals.queued()
        return stored.id

    def cancel_build(self, job_id: str, reason: str) -> None:
        """Cancel a build job (its template was deleted)."""
        row = self.store.job(job_id)
        if row is not None and not row.final:
            self.store.cancel_job(job_id, reason[:500])
            self.signals.cancel(job_id)
            self.signals.changed(job_id)

    def get(self, team: Team, job_id: str) -> JobRecord:
        return self._record(self._row(team, job_id))

    def _row(self, team: Team, job_id: str) -> JobRow:
        """The team's job as stored; NotFound for another team's."""
        row = self.store.job(job_id) if isinstance(job_id, str) and job_id else None
        if row is None or row.team_id != team.id:
            raise self._not_found(job_id)
        return row

    def _not_found(self, job_id: str) -> NotFound:
        kept = ""
        retention = self.settings.job_retention
        if retention > 0:
            kept = (
                f" (finished jobs are deleted, with their logs, {_duration(retention)} "
                "after they end: CORRAL_JOB_RETENTION)"
            )
        return NotFound(f"no job {job_id!r}; check the id with `corral job list`{kept}")

    def list_jobs(
        self,
        team: Team,
        *,
        states: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        template: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        unknown = [s for s in states if s not in JOB_STATES]
        if unknown:
            raise InvalidRequest(f"unknown states {unknown}; use some of {', '.join(JOB_STATES)}")
        rows, token = self.store.list_jobs(
            team.id,
            states=states,
            labels=check_labels(labels or {}),
            template=template,
            page_size=check_page_size(page_size),
            page_token=page_token,
        )
        return self._records(rows), token

    def cancel(self, team: Team, job_id: str, reason: str = "") -> JobRecord:
        row = self._row(team, job_id)
        if row.final:
            return self._record(row)
        reason = (reason or "by request")[:500]
        updated = self.store.cancel_job(row.id, reason)
        assert updated is not None
        self.signals.cancel(row.id)
        self.signals.changed(row.id)
        return self._record(updated)

    async def wait_final(self, job_id: str, timeout: float) -> JobRecord:
        """The job once it has ended, or as it is after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            wake = self.signals.watch(job_id)  # before the read: no change is missed
            row = self.store.job(job_id)
            if row is None:  # deleted by retention since
                raise self._not_found(job_id)
            left = deadline - time.monotonic()
            if row.final or left <= 0:
                return self._record(row)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(left, self.signals.poll))

    def retry(self, team: Team, job_id: str) -> JobRecord:
        row = self._row(team, job_id)
        if not may_retry_by_request(row.state):
            raise InvalidRequest(
                f"job {job_id} is {row.state}; only a finished job can be retried "
                "(cancel it first to start over)"
            )
        updated = self.store.retry_job(row.id)
        assert updated is not None
        self.signals.queued()
        self.signals.changed(row.id)
        return self._record(updated)

    def _record(self, row: JobRow) -> JobRecord:
        (record,) = self._records([row])
        return record

    def _records(self, rows: Sequence[JobRow]) -> list[JobRecord]:
        """The jobs as the service shows them, with their callbacks' delivery counts."""
        counts = self.store.callback_counts([r.id for r in rows if r.callback_url])
        limit = self.settings.job_log_limit
        return [JobRecord.from_row(r, counts.get(r.id), limit) for r in rows]

    # -- following ----------------------------------------------------------------------

    async def follow_logs(
        self,
        team: Team,
        job_id: str,
        *,
        offset: int = 0,
        follow: bool = False,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[tuple[list[LogChunkRow], JobRecord | None]]:
        """Batches of log chunks from `offset`; the last batch carries the finished job
        when the stream ended because the job did (always with `follow`). A follow also
        ends once `stop` is set (its reader went away)."""

        def read(job_id: str, offset: int) -> list[LogChunkRow]:
            return self.store.job_logs(job_id, offset, PAGE_ROWS, max_bytes=PAGE_BYTES)

        def end(job: JobRow) -> int:
            return job.next_log_seq

        batches = self._follow(team, job_id, offset, follow, stop, read, end)
        async for batch in batches:
            yield batch

    async def follow_events(
        self,
        team: Team,
        job_id: str,
        *,
        offset: int = 0,
        follow: bool = False,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[tuple[list[JobEventRow], JobRecord | None]]:
        def read(job_id: str, offset: int) -> list[JobEventRow]:
            return self.store.job_events(job_id, offset, PAGE_ROWS)

        def end(job: JobRow) -> int:
            return job.next_event_seq

        batches = self._follow(team, job_id, offset, follow, stop, read, end)
        async for batch in batches:
            yield batch

    async def _follow(
        self,
        team: Team,
        job_id: str,
        offset: int,
        follow: bool,
        stop: asyncio.Event | None,
        read: _Reader[T],
        end: Callable[[JobRow], int],
    ) -> AsyncIterator[tuple[list[T], JobRecord | None]]:
        """Pages of rows from `read`; `end` is the job's next seq of them."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequest(f"offset={offset!r} must be a whole number >= 0")
        self._row(team, job_id)
        while stop is None or not stop.is_set():
            wake = self.signals.watch(job_id)
            # The job's state is read before its rows: if it had ended, every row it will
            # ever have is written, and this read returns them.
            job = self.store.job(job_id)
            if job is None:  # deleted by retention since
                raise self._not_found(job_id)
            rows = read(job_id, offset)
            if rows:
                offset = rows[-1].seq + 1
            if rows and offset < end(job):
                # The page (bounded in rows and bytes) ended before the rows the job had
                # when it was read: read on at once.
                yield rows, None
                continue
            if job.final or not follow:
                yield rows, self._record(job) if job.final else None
                return
            if rows:
                yield rows, None
            await _first(wake, stop, self.signals.poll)


async def _first(wake: asyncio.Event, stop: asyncio.Event | None, timeout: float) -> None:
    """Until `wake` or `stop` is set, or `timeout` seconds pass."""
    waits = [asyncio.ensure_future(e.wait()) for e in (wake, stop) if e is not None]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
