"""The job queue in SQL: job rows, their events, log chunks and callback deliveries.

Every change of a job's state is one transaction with its event (and, when the job has a
callback URL, the event's delivery in the outbox), so what a reader sees has been
written. Workers claim queued jobs with a lease they renew by heartbeat; writes from a
worker name the attempt they belong to and change nothing once that attempt has lost
its lease, so a worker that comes back from the dead cannot overwrite its successor.

Claims are fair between teams: a job's priority orders only its own team's jobs, and a
free worker slot goes to the team with the fewest running jobs (of those with a job to
claim and below their `max_running_jobs`), the team whose last job started longest ago
first among equals; then to that team's highest priority, oldest job. So a team that
floods the queue, at any priority, cannot hold another team's jobs back beyond an equal
share of the workers: the next free slot goes to a team with fewer running jobs.

Claims fit the host: a worker says how much memory it has free (`room_mib`), and a slot
goes only to a job whose sandbox fits in what is left of it, so a job waiting for room
stays queued (no claim, no events, no callbacks) rather than being claimed and given back.
A team waits for room for its best job (its smaller jobs do not pass it), while teams
after it in the turn take jobs that fit. So that a big job is not starved by a stream of
smaller ones of other teams, once it has been due for `ROOM_RESERVE_SECONDS` it reserves
its memory: the claim gives the teams after it in the turn only the room beyond it, and
the host drains until it fits. (Its team, with fewer running jobs, usually comes first.)

Claims lock rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL: concurrent workers take
different jobs, and the team row is locked while its jobs are claimed, so its running
count (read after the lock) cannot pass its cap; on SQLite `BEGIN IMMEDIATE` serializes
claims instead.

Logs are bounded three ways: per job (the worker's log limit), per team (its
`max_log_mib`, against a running total kept with every write), and by age (finished
jobs are deleted after the retention period, their logs with them). Past a job's first
`INLINE_LOG_BYTES`, its output goes to its log file (`corral.store.logfiles`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from corral.errors import IdempotencyConflict, NotFound
from corral.store.database import Database
from corral.store.logfiles import LogFiles
from corral.store.pages import decode_token, encode_token
from corral.store.schema import (
    JOB_FINAL_STATES,
    job_callbacks,
    job_events,
    job_logs,
    jobs,
    teams,
)

# Events whose callback is retried (up to CALLBACK_ATTEMPTS); others are tried once.
CRITICAL_EVENTS = ("done", "error", "step_end")
CALLBACK_ATTEMPTS = 10
# A job's first bytes of output stay in its log rows (most jobs print less than this and
# need no file); the rest goes to its log file when the store has one (SQLite).
INLINE_LOG_BYTES = 16 * 1024
MIB = 1024 * 1024
# A job due this long that does not fit the worker's free memory holds its memory back
# from other teams' smaller jobs (see the module docstring): long enough that small jobs
# fill a busy host, short enough that a big one waits minutes, not forever.
ROOM_RESERVE_SECONDS = 60.0


@dataclass(frozen=True)
class JobRow:
    """One job as stored."""

    id: str
    team_id: str
    idempotency_key: str | None
    kind: str
    template: str
    isolation: str
    memory_mib: int
    spec: dict[str, Any]
    labels: dict[str, str]
    priority: int
    state: str
    state_reason: str
    attempt: int
    max_attempts: int
    lost_count: int
    run_after: datetime
    worker: str | None
    lease_expires_at: datetime | None
    cancel_reason: str | None
    exit_code: int | None
    next_log_seq: int
    log_bytes: int
    log_truncated: bool
    next_event_seq: int
    callback_url: str | None
    callback_secret: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def final(self) -> bool:
        return self.state in JOB_FINAL_STATES


@dataclass(frozen=True)
class JobEventRow:
    job_id: str
    seq: int
    at: datetime
    attempt: int
    type: str
    state: str | None
    reason: str
    data: dict[str, Any]


@dataclass(frozen=True)
class LogChunkRow:
    job_id: str
    seq: int
    attempt: int
    step: int
    stream: int  # 1 stdout, 2 stderr
    data: bytes
    at: datetime


@dataclass(frozen=True)
class NewEvent:
    """An event to record: its type, the state it moves the job to (if any), why."""

    type: str
    reason: str = ""
    state: str | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class CallbackRow:
    id: int
    job_id: str
    event_seq: int
    critical: bool
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str
    payload: dict[str, Any]
    delivered_at: datetime | None


@dataclass(frozen=True)
class DueCallbacks:
    """A job with callback deliveries due, and what limits how many go at once."""

    job_id: str
    team_id: str
    callback_url: str | None


@dataclass(frozen=True)
class CallbackCounts:
    delivered: int = 0
    pending: int = 0
    failed: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class Attempt:
    """Which attempt of which job a worker's write belongs to."""

    job_id: str
    worker: str
    attempt: int


def _now() -> datetime:
    return datetime.now(UTC)


# The statements of a job's hot path (claim, output, end, follow), built once: building
# and keying a statement costs SQLAlchemy ~60 µs, five times what SQLite takes to run it.
_JOB = sa.select(jobs).where(jobs.c.id == sa.bindparam("job_id"))
_LOCK_JOB = _JOB.with_for_update()
_UPDATE_JOB = jobs.update().where(jobs.c.id == sa.bindparam("job_id"))  # SET: the params
_INSERT_JOB = jobs.insert()
_INSERT_EVENTS = job_events.insert()
_INSERT_LOGS = job_logs.insert()
_INSERT_CALLBACKS = job_callbacks.insert()
# A log write reads (and locks) the job with its team's quota and total in one statement.
_LOCK_JOB_AND_TEAM_LOGS = (
    sa.select(jobs, teams.c.max_log_mib, teams.c.log_bytes.label("team_log_bytes"))
    .join(teams, teams.c.id == jobs.c.team_id)
    .where(jobs.c.id == sa.bindparam("job_id"))
    .with_for_update()
)
_ADD_TEAM_LOGS = (
    teams.update()
    .where(teams.c.id == sa.bindparam("team_id"))
    .values(log_bytes=teams.c.log_bytes + sa.bindparam("added"))
)


# Claims: the statements of `claim_jobs`, for one team (a parameter, or each team row).
def _due(team_id: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """The team's queued jobs that are due and ask for one of the worker's isolations."""
    return (
        sa.select(jobs)
        .where(jobs.c.team_id == team_id)
        .where(jobs.c.state == "queued")
        .where(jobs.c.run_after <= sa.bindparam("now"))
        .where(jobs.c.isolation.in_(sa.bindparam("isolations", expanding=True)))
    )


def _running(team_id: sa.ColumnElement[Any]) -> sa.Select[Any]:
    return (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.team_id == team_id)
        .where(jobs.c.state == "running")
    )


_TEAM: sa.BindParameter[str] = sa.bindparam("team_id")
# Teams with a due job: cap, running count, last start. Each is one lookup in an index
# (the claim index, or team_id + started_at): no scan of the queue.
_TEAMS_DUE = sa.select(
    teams.c.id,
    teams.c.max_running_jobs,
    _running(teams.c.id).scalar_subquery().label("running"),
    sa.select(sa.func.max(jobs.c.started_at))
    .where(jobs.c.team_id == teams.c.id)
    .scalar_subquery()
    .label("last_start"),
).where(_due(teams.c.id).with_only_columns(jobs.c.id).exists())
_LOCK_TEAM = sa.select(teams.c.id).where(teams.c.id == _TEAM).with_for_update(skip_locked=True)
_TEAM_RUNNING = _running(_TEAM)
_TEAM_DUE = (
    _due(_TEAM)
    .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
    .limit(sa.bindparam("n"))
    .with_for_update(skip_locked=True)
)
_NEVER = datetime.min.replace(tzinfo=UTC)


@dataclass
class _Turn:
    """A team in a claim: its running jobs (those claimed so far included), when its last
    job started, and its due jobs once looked up (best first)."""

    team_id: str
    cap: int
    running: int
    last_start: datetime
    due: list[JobRow] | None = None

    def order(self) -> tuple[int, datetime, str]:
        return (self.running, self.last_start, self.team_id)


@dataclass
class _Room:
    """The memory a claim may still hand out (None: no bound), and the host's capacity."""

    mib: int | None
    capacity_mib: int | None
    now: datetime

    def take(self, job: JobRow) -> bool:
        """Whether `job` fits; if so its memory is taken, else, once it has waited
        `ROOM_RESERVE_SECONDS`, reserved (so nothing smaller takes the room it waits for)."""
        if self.mib is None:
            return True
        if self.capacity_mib is not None and job.memory_mib > self.capacity_mib:
            return True  # it never fits: its worker fails it, with no sandbox
        if job.memory_mib <= self.mib:
            self.mib -= job.memory_mib
            return True
        if (self.now - job.run_after).total_seconds() >= ROOM_RESERVE_SECONDS:
            self.mib -= job.memory_mib
        return False


def _job(row: sa.Row[Any]) -> JobRow:
    return JobRow(**row._asdict())


def _canonical(spec: Mapping[str, Any]) -> str:
    """A spec as JSON with sorted keys: equal for equal specs, before and after the store."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _owns(row: JobRow, attempt: Attempt) -> bool:
    """Whether `attempt` is the job's running attempt (the only one that may write)."""
    return (
        row.state == "running" and row.worker == attempt.worker and row.attempt == attempt.attempt
    )


def _coalesce(chunks: Sequence[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Adjacent chunks of the same step and stream as one: a chatty command's reads
    become one row per write, not one per read."""
    runs: list[tuple[int, int, list[bytes]]] = []
    for step, stream, data in chunks:
        if runs and runs[-1][:2] == (step, stream):
            runs[-1][2].append(data)
        else:
            runs.append((step, stream, [data]))
    return [(step, stream, b"".join(parts)) for step, stream, parts in runs]


class JobStore(Database):
    """Jobs: submit, claim under lease, record output and events, end, requeue."""

    # -- submitting and reading ---------------------------------------------------------

    def insert_job(self, row: JobRow, reason: str = "queued") -> tuple[JobRow, bool]:
        """Queue a job; with an idempotency key already used by its team, return that
        team's earlier job instead (and False) if its spec is the same, else refuse the
        key (IdempotencyConflict, as Stripe does: a key names one request, not a slot)."""
        with self._write() as conn:
            if row.idempotency_key is not None:
                earlier = conn.execute(
                    sa.select(jobs)
                    .where(jobs.c.team_id == row.team_id)
                    .where(jobs.c.idempotency_key == row.idempotency_key)
                ).first()
                if earlier is not None:
                    first = _job(earlier)
                    if _canonical(first.spec) != _canonical(row.spec):
                        raise IdempotencyConflict(
                            f"idempotency key {row.idempotency_key!r} was used for job "
                            f"{first.id} with another spec; submit with a new key, or the "
                            "same spec to get that job"
                        )
                    return first, False
            inserted = replace(row, next_event_seq=row.next_event_seq + 1)
            conn.execute(_INSERT_JOB, asdict(inserted))
            self._add_events(conn, row, row.attempt, [NewEvent("state", reason, row.state)])
            return inserted, True

    def job(self, job_id: str) -> JobRow | None:
        with self._read() as conn:
            found = conn.execute(_JOB, {"job_id": job_id}).first()
        return None if found is None else _job(found)

    def list_jobs(
        self,
        team_id: str,
        *,
        states: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        template: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> tuple[list[JobRow], str]:
        """A page of a team's jobs, newest first, and the token of the next page."""
        query = (
            sa.select(jobs)
            .where(jobs.c.team_id == team_id)
            .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
            .limit(page_size + 1)
        )
        if states:
            query = query.where(jobs.c.state.in_(states))
        if template:
            query = query.where(jobs.c.template == template)
        for key, value in (labels or {}).items():
            query = query.where(jobs.c.labels[key].as_string() == value)
        if page_token:
            at, last_id = decode_token(page_token)
            query = query.where(
                sa.or_(
                    jobs.c.created_at < at,
                    sa.and_(jobs.c.created_at == at, jobs.c.id < last_id),
                )
            )
        with self._read() as conn:
            rows = [_job(r) for r in conn.execute(query)]
        if len(rows) > page_size:
            rows = rows[:page_size]
            return rows, encode_token(rows[-1].created_at, rows[-1].id)
        return rows, ""

    def job_events(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[JobEventRow]:
        return [JobEventRow(**r) for r in self._from_seq(job_events, job_id, offset, limit)]

    def job_logs(
        self, job_id: str, offset: int = 0, limit: int = 1000, max_bytes: int | None = None
    ) -> list[LogChunkRow]:
        """A job's log chunks from seq `offset`, in order: at most `limit` of them, and
        no more once they hold `max_bytes` (at least one, however large)."""
        rows = self._from_seq(job_logs, job_id, offset, limit)
        if max_bytes is not None:
            total = 0
            for count, row in enumerate(rows, 1):
                total += row["size"]
                if total >= max_bytes:
                    del rows[count:]
                    break
        in_file = [r for r in rows if r["file_offset"] is not None]
        if in_file:
            if self._log_files is None:
                raise RuntimeError(f"job {job_id} has logs in files, but this store has none")
            try:
                found = self._log_files.read(
                    job_id, [(r["file_offset"], r["size"]) for r in in_file]
                )
            except FileNotFoundError:
                raise NotFound(
                    f"the logs of job {job_id} were deleted (finished jobs are deleted after "
                    "the server's retention period, CORRAL_JOB_RETENTION)"
                ) from None
            for row, data in zip(in_file, found, strict=True):
                row["data"] = data
        for row in rows:
            del row["size"], row["file_offset"]
        return [LogChunkRow(**r) for r in rows]

    @cached_property
    def _log_files(self) -> LogFiles | None:
        """The job log files beside the SQLite database; None for PostgreSQL (or SQLite
        in memory): logs stay in the rows."""
        url = self._db.url
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        return LogFiles(Path(url.database).parent / "job-logs")

    def _from_seq(
        self, table: sa.Table, job_id: str, offset: int, limit: int
    ) -> list[dict[str, Any]]:
        """A job's rows of `table` (events or log chunks) from seq `offset`, in order."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(table)
                .where(table.c.job_id == job_id)
                .where(table.c.seq >= offset)
                .order_by(table.c.seq)
                .limit(limit)
            )
            return [r._asdict() for r in found]

    # -- workers ------------------------------------------------------------------------

    def claim_jobs(
        self,
        worker: str,
        isolations: Sequence[str],
        limit: int,
        lease: float,
        *,
        room_mib: int | None = None,
        capacity_mib: int | None = None,
    ) -> list[JobRow]:
        """Take up to `limit` due queued jobs that ask for one of `isolations`, shared
        between teams as the module's docstring says; each becomes running under this
        worker's lease. With `room_mib`, only jobs whose memory fits in it together; a job
        above `capacity_mib` (the host's whole capacity) is taken regardless, since it
        needs no room: its worker fails it at once."""
        now = _now()
        with self._write() as conn:
            room = _Room(room_mib, capacity_mib, now)
            due = self._fair_share(conn, list(isolations), limit, now, room)
            if not due:
                return []
            claim: dict[str, Any] = dict(
                state="running",
                state_reason=f"running on {worker}",
                worker=worker,
                lease_expires_at=now + timedelta(seconds=lease),
                started_at=now,
                exit_code=None,
                updated_at=now,
            )
            conn.execute(
                jobs.update()
                .where(jobs.c.id.in_([row.id for row in due]))
                .values(
                    attempt=jobs.c.attempt + 1,
                    next_event_seq=jobs.c.next_event_seq + 1,  # the "running" event below
                    **claim,
                )
            )
            claimed = [replace(row, attempt=row.attempt + 1, **claim) for row in due]
            for row in claimed:
                event = NewEvent("state", row.state_reason, "running", {"worker": worker})
                self._add_events(conn, row, row.attempt, [event])
        return [replace(row, next_event_seq=row.next_event_seq + 1) for row in claimed]

    def _fair_share(
        self, conn: sa.Connection, isolations: list[str], limit: int, now: datetime, room: _Room
    ) -> list[JobRow]:
        """Up to `limit` due jobs, picked one at a time: each from the team whose turn it
        is (fewest running, then served longest ago), its best job (priority, then age)
        if that fits the `room` left, else none of the team's."""
        params = {"now": now, "isolations": isolations}
        turns = [
            _Turn(r.id, r.max_running_jobs, r.running, r.last_start or _NEVER)
            for r in conn.execute(_TEAMS_DUE, params)
        ]
        picked: list[JobRow] = []
        while len(picked) < limit:
            waiting = [t for t in turns if t.running < t.cap and t.due != []]
            if not waiting:
                break
            turn = min(waiting, key=_Turn.order)
            if turn.due is None:
                turn.due = self._team_due(conn, turn, limit - len(picked), params)
                continue  # its running count was read again: choose again
            if not room.take(turn.due[0]):
                turn.due = []  # the team waits for room for its best job
                continue
            picked.append(turn.due.pop(0))
            turn.running += 1
            turn.last_start = now
        return picked

    @staticmethod
    def _team_due(
        conn: sa.Connection, turn: _Turn, room: int, params: dict[str, Any]
    ) -> list[JobRow]:
        """The team's best due jobs, as many as `room` and its cap allow, locked.

        On PostgreSQL the team row is locked first (a claimer that holds it already makes
        this one skip the team) and its running jobs are counted after the lock, so two
        claimers cannot both take its last free place. On SQLite the lock is a plain read
        and the count finds what the claim read already: its write transaction holds the
        whole database."""
        team = {"team_id": turn.team_id}
        if conn.execute(_LOCK_TEAM, team).first() is None:
            return []
        turn.running = conn.execute(_TEAM_RUNNING, team).scalar_one()
        room = min(room, turn.cap - turn.running)
        if room <= 0:
            return []
        return [_job(r) for r in conn.execute(_TEAM_DUE, {**params, **team, "n": room})]

    def heartbeat(self, worker: str, job_ids: Iterable[str], lease: float) -> dict[str, str]:
        """Extend the lease of this worker's running jobs. Returns the jobs it must stop,
        with why: a cancel was asked, or the job is no longer this worker's."""
        job_ids = list(job_ids)
        if not job_ids:
            return {}
        now = _now()
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id.in_(job_ids))
                .where(jobs.c.worker == worker)
                .where(jobs.c.state == "running")
                .values(lease_expires_at=now + timedelta(seconds=lease))
            )
            found = {
                r.id: r
                for r in conn.execute(
                    sa.select(jobs.c.id, jobs.c.state, jobs.c.worker, jobs.c.cancel_reason).where(
                        jobs.c.id.in_(job_ids)
                    )
                )
            }
        stop: dict[str, str] = {}
        for job_id in job_ids:
            r = found.get(job_id)
            if r is None or r.state != "running" or r.worker != worker:
                stop[job_id] = "lost"
            elif r.cancel_reason is not None:
                stop[job_id] = "cancel"
        return stop

    def append_logs(
        self, attempt: Attempt, chunks: Sequence[tuple[int, int, bytes]], limit: int
    ) -> tuple[bool, int]:
        """Store output chunks (step, stream, data) of a running attempt, in order, up to
        the job's log limit of `limit` bytes and its team's log quota (`max_log_mib`).

        Returns (still the owner, bytes dropped by the limit or the quota). The first
        time output is dropped the job is marked truncated and a `log_truncated` event
        says which bound did it; the job goes on.
        """
        now = _now()
        with self._write() as conn:
            found = conn.execute(_LOCK_JOB_AND_TEAM_LOGS, {"job_id": attempt.job_id}).first()
            if found is None:
                return False, 0
            fields = found._asdict()
            quota_mib, team_used = fields.pop("max_log_mib"), fields.pop("team_log_bytes")
            row = JobRow(**fields)
            if not _owns(row, attempt):
                return False, 0
            quota = quota_mib * MIB
            job_room, team_room = limit - row.log_bytes, quota - team_used
            kept: list[tuple[int, int, bytes]] = []
            dropped, by_quota = 0, False
            for step, stream, data in _coalesce(chunks):
                room = max(0, min(job_room, team_room))
                if len(data) > room:
                    if not dropped:  # the first bound reached is the one the event names
                        by_quota = team_room < job_room
                    dropped += len(data) - room
                    data = data[:room]
                if data:
                    kept.append((step, stream, data))
                    job_room -= len(data)
                    team_room -= len(data)
            seq, used = self._insert_logs(conn, row, attempt, kept, now)
            if used > row.log_bytes:
                conn.execute(
                    _ADD_TEAM_LOGS, {"team_id": row.team_id, "added": used - row.log_bytes}
                )
            truncate = dropped > 0 and not row.log_truncated
            next_event_seq = row.next_event_seq
            if truncate:
                if by_quota:
                    reason = (
                        f"output past the team's log quota of {quota_mib} MiB "
                        "(max_log_mib) is dropped: its jobs' stored logs fill it until "
                        "finished jobs are deleted (CORRAL_JOB_RETENTION)"
                    )
                    info: dict[str, Any] = {"limit_bytes": quota, "quota": "max_log_mib"}
                else:
                    reason = f"output past the log limit of {limit} bytes is dropped"
                    info = {"limit_bytes": limit}
                next_event_seq = self._add_events(
                    conn, row, attempt.attempt, [NewEvent("log_truncated", reason, None, info)]
                )
            self._update(
                conn,
                attempt.job_id,
                next_log_seq=seq,
                log_bytes=used,
                log_truncated=row.log_truncated or truncate,
                next_event_seq=next_event_seq,
            )
        return True, dropped

    def _insert_logs(
        self,
        conn: sa.Connection,
        row: JobRow,
        attempt: Attempt,
        chunks: Sequence[tuple[int, int, bytes]],
        now: datetime,
    ) -> tuple[int, int]:
        """Insert the rows of `chunks` after the job's last one: the job's first
        INLINE_LOG_BYTES in the rows, the rest in its log file, written before the rows
        that point at it. Returns the job's next log seq and its log bytes."""
        seq, used, in_file = row.next_log_seq, row.log_bytes, 0
        values: list[dict[str, Any]] = []
        to_file: list[bytes] = []
        for step, stream, data in chunks:
            inline = self._log_files is None or used + len(data) <= INLINE_LOG_BYTES
            values.append(
                {
                    "job_id": row.id,
                    "seq": seq,
                    "attempt": attempt.attempt,
                    "step": step,
                    "stream": stream,
                    "data": data if inline else b"",
                    "at": now,
                    "size": len(data),
                    "file_offset": None if inline else in_file,
                }
            )
            if not inline:
                to_file.append(data)
                in_file += len(data)
            seq += 1
            used += len(data)
        if to_file:
            assert self._log_files is not None
            start = self._log_files.append(row.id, b"".join(to_file))
            for value in values:
                if value["file_offset"] is not None:
                    value["file_offset"] += start
        if values:
            conn.execute(_INSERT_LOGS, values)
        return seq, used

    def add_events(self, attempt: Attempt, events: Sequence[NewEvent]) -> bool:
        """Record events of a running attempt (step_start, step_end …); False when the
        attempt is no longer its worker's."""
        with self._write() as conn:
            row = self._owned(conn, attempt)
            if row is None:
                return False
            seq = self._add_events(conn, row, attempt.attempt, events)
            self._update(conn, attempt.job_id, next_event_seq=seq)
        return True

    def end_attempt(
        self,
        attempt: Attempt,
        state: str,
        reason: str,
        *,
        exit_code: int | None,
        retry_at: datetime | None = None,
    ) -> JobRow | None:
        """End a running attempt: with `state` (a final one), or queued again at
        `retry_at`. None when the attempt was no longer its worker's."""
        now = _now()
        with self._write() as conn:
            row = self._owned(conn, attempt)
            if row is None:
                return None
            changes: dict[str, Any] = {
                "lease_expires_at": None,
                "exit_code": exit_code,
                "updated_at": now,
            }
            events = []
            if retry_at is not None:
                events.append(
                    NewEvent(
                        "retry_scheduled",
                        f"attempt {attempt.attempt} {state}: {reason}",
                        None,
                        {"run_after": retry_at.isoformat(), "exit_code": exit_code},
                    )
                )
                state, reason = "queued", f"retry {attempt.attempt} of {row.max_attempts - 1}"
                changes["run_after"] = retry_at
            else:
                changes["finished_at"] = now
            changes.update(state=state, state_reason=reason)
            events.append(NewEvent("state", reason, state, {"exit_code": exit_code}))
            changes["next_event_seq"] = self._add_events(conn, row, attempt.attempt, events)
            self._update(conn, attempt.job_id, **changes)
            return replace(row, **changes)  # what was just written

    def release_attempt(
        self,
        attempt: Attempt,
        reason: str,
        *,
        started: bool = True,
        run_after: datetime | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> JobRow | None:
        """Give a running attempt back to the queue without spending one of the job's
        retries (or cancel it, when a cancel waits). Two cases:

        - `started` (its worker is shutting down): it runs again from the start, as a
          new attempt, and one more attempt is allowed;
        - not `started` (the host had no room for its sandbox: nothing ran): the claim is
          taken back, attempt counter included (the attempt never ran), a `requeued`
          event says why (with `data`), and the job is claimed again from `run_after`.
        """
        now = _now()
        with self._write() as conn:
            row = self._owned(conn, attempt)
            if row is None:
                return None
            state = "canceled" if row.cancel_reason is not None else "queued"
            text = f"canceled: {row.cancel_reason}" if state == "canceled" else reason
            events = [NewEvent("state", text, state)]
            if state == "queued" and not started:
                events.insert(0, NewEvent("requeued", reason, None, data))
            changes: dict[str, Any] = dict(
                state=state,
                state_reason=text,
                lease_expires_at=None,
                run_after=run_after or now,
                attempt=row.attempt - (not started),
                max_attempts=row.max_attempts + (state == "queued" and started),
                finished_at=now if state == "canceled" else None,
                updated_at=now,
                next_event_seq=self._add_events(conn, row, attempt.attempt, events),
            )
            self._update(conn, attempt.job_id, **changes)
            return replace(row, **changes)

    def make_due(self, job_id: str) -> None:
        """A queued job waiting for its run_after may be claimed now (room was freed)."""
        now = _now()
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .where(jobs.c.state == "queued")
                .where(jobs.c.run_after > now)
                .values(run_after=now)
            )

    def count_events(self, job_id: str, type: str) -> int:
        """How many events of `type` the job has (e.g. how often it waited for room)."""
        with self._read() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(job_events)
                    .where(job_events.c.job_id == job_id)
                    .where(job_events.c.type == type)
                ).scalar_one()
            )

    def expire_worker(self, worker: str) -> None:
        """End the leases of a worker known to be dead, so `expire_leases` takes its jobs
        now rather than when the leases run out."""
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.worker == worker)
                .where(jobs.c.state == "running")
                .values(lease_expires_at=_now() - timedelta(seconds=1))
            )

    def running_workers(self) -> list[str]:
        """The workers that hold running jobs."""
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.select(jobs.c.worker).where(jobs.c.state == "running").distinct()
                ).scalars()
            )

    def expire_leases(self, max_lost: int) -> list[JobRow]:
        """Jobs whose worker stopped heartbeating: requeued (attempt counter kept), or
        lost when this is the `max_lost`-th worker they lost, or canceled when a cancel
        waits."""
        now = _now()
        changed = []
        with self._write() as conn:
            expired = [
                _job(r)
                for r in conn.execute(
                    sa.select(jobs)
                    .where(jobs.c.state == "running")
                    .where(jobs.c.lease_expires_at < now)
                    .with_for_update(skip_locked=True)
                )
            ]
            for row in expired:
                lost = row.lost_count + 1
                gone = f"worker {row.worker} stopped heartbeating (attempt {row.attempt})"
                if row.cancel_reason is not None:
                    state, reason = "canceled", f"canceled: {row.cancel_reason}; {gone}"
                elif lost >= max_lost:
                    state, reason = "lost", f"lost: {gone}; {lost} workers lost, giving up"
                else:
                    state, reason = "queued", f"requeued: {gone}"
                changes: dict[str, Any] = dict(
                    state=state,
                    state_reason=reason,
                    lost_count=lost,
                    lease_expires_at=None,
                    updated_at=now,
                )
                if state == "queued":
                    changes["run_after"] = now
                    # A lost worker does not spend one of the job's own retries.
                    changes["max_attempts"] = row.max_attempts + 1
                else:
                    changes["finished_at"] = now
                event = NewEvent("state", reason, state)
                changes["next_event_seq"] = self._add_events(conn, row, row.attempt, [event])
                self._update(conn, row.id, **changes)
                changed.append(replace(row, **changes))
        return changed

    # -- requests -----------------------------------------------------------------------

    def cancel_job(self, job_id: str, reason: str) -> JobRow | None:
        """A queued job is canceled now; a running one is marked for its worker, which
        kills it at its next heartbeat (or at once, in the same process)."""
        now = _now()
        with self._write() as conn:
            row = self._locked(conn, job_id)
            if row is None:
                return None
            changes: dict[str, Any] = {}
            if row.state == "queued":
                text = f"canceled: {reason}"
                changes = dict(
                    state="canceled",
                    state_reason=text,
                    cancel_reason=reason,
                    finished_at=now,
                    updated_at=now,
                    next_event_seq=self._add_events(
                        conn, row, row.attempt, [NewEvent("state", text, "canceled")]
                    ),
                )
            elif row.state == "running" and row.cancel_reason is None:
                changes = dict(cancel_reason=reason, updated_at=now)
            if changes:
                self._update(conn, job_id, **changes)
            return replace(row, **changes)

    def retry_job(self, job_id: str) -> JobRow | None:
        """Queue a finished job again for one more attempt; None if unknown. A job that
        is not finished is returned unchanged (the caller says why)."""
        now = _now()
        with self._write() as conn:
            row = self._locked(conn, job_id)
            if row is None or not row.final:
                return row
            reason = f"queued again by request (after {row.state})"
            changes: dict[str, Any] = dict(
                state="queued",
                state_reason=reason,
                max_attempts=row.attempt + 1,
                lost_count=0,
                run_after=now,
                cancel_reason=None,
                finished_at=None,
                updated_at=now,
                next_event_seq=self._add_events(
                    conn, row, row.attempt, [NewEvent("state", reason, "queued")]
                ),
            )
            self._update(conn, job_id, **changes)
            return replace(row, **changes)

    # -- retention ----------------------------------------------------------------------

    def delete_finished_jobs(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` jobs that finished before `before` (oldest first), with
        their events, logs (rows and file) and callback deliveries; how many went.

        One short transaction per call: a sweep calls again while this returns `limit`.
        The files go before the commit: should it fail, the rows stay and the next sweep
        deletes them (a reader meanwhile is told the logs were deleted).
        """
        with self._write() as conn:
            found = conn.execute(
                sa.select(jobs.c.id, jobs.c.team_id, jobs.c.log_bytes)
                .where(jobs.c.finished_at < before)
                .where(jobs.c.state.in_(JOB_FINAL_STATES))
                .order_by(jobs.c.finished_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if not found:
                return 0
            ids = [r.id for r in found]
            for table in (job_logs, job_events, job_callbacks):
                conn.execute(table.delete().where(table.c.job_id.in_(ids)))
            conn.execute(jobs.delete().where(jobs.c.id.in_(ids)))
            freed: Counter[str] = Counter()
            for r in found:
                freed[r.team_id] += r.log_bytes
            for team_id, size in freed.items():
                if size:
                    conn.execute(_ADD_TEAM_LOGS, {"team_id": team_id, "added": -size})
            if self._log_files is not None:
                self._log_files.delete(ids)
        return len(ids)

    def team_log_bytes(self, team_id: str) -> int:
        """The bytes of job logs the team's jobs keep (what its log quota bounds)."""
        with self._read() as conn:
            used = conn.execute(
                sa.select(teams.c.log_bytes).where(teams.c.id == team_id)
            ).scalar_one_or_none()
        return int(used or 0)

    # -- callbacks ----------------------------------------------------------------------

    def due_callback_jobs(self, limit: int, exclude: Sequence[str] = ()) -> list[DueCallbacks]:
        """Jobs with deliveries due now, the one waiting longest first, unclaimed: what a
        dispatcher chooses from (`exclude`: the jobs it is sending already)."""
        first = sa.func.min(job_callbacks.c.id).label("first")
        query = (
            sa.select(job_callbacks.c.job_id, jobs.c.team_id, jobs.c.callback_url, first)
            .join(jobs, jobs.c.id == job_callbacks.c.job_id)
            .where(job_callbacks.c.state == "pending")
            .where(job_callbacks.c.next_attempt_at <= _now())
            .group_by(job_callbacks.c.job_id, jobs.c.team_id, jobs.c.callback_url)
            .order_by(first)
            .limit(limit)
        )
        if exclude:
            query = query.where(job_callbacks.c.job_id.not_in(list(exclude)))
        with self._read() as conn:
            return [DueCallbacks(r.job_id, r.team_id, r.callback_url) for r in conn.execute(query)]

    def due_callbacks(
        self, limit: int, hold: float, job_ids: Sequence[str] | None = None
    ) -> list[CallbackRow]:
        """Claim pending deliveries that are due (with `job_ids`: theirs, up to `limit`
        per job), oldest first: each is held for `hold` seconds (its next attempt moves
        past that), so another process does not send it meanwhile."""
        now = _now()
        due = (
            sa.select(job_callbacks)
            .where(job_callbacks.c.state == "pending")
            .where(job_callbacks.c.next_attempt_at <= now)
            .order_by(job_callbacks.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        queries = (
            [due] if job_ids is None else [due.where(job_callbacks.c.job_id == j) for j in job_ids]
        )
        with self._write() as conn:
            found = [CallbackRow(**r._asdict()) for q in queries for r in conn.execute(q)]
            if found:
                conn.execute(
                    job_callbacks.update()
                    .where(job_callbacks.c.id.in_([c.id for c in found]))
                    .values(next_attempt_at=now + timedelta(seconds=hold))
                )
        return found

    def callback_done(
        self, callback_id: int, *, error: str | None, retry_at: datetime | None
    ) -> None:
        """Record one delivery attempt: delivered (error None), retried at `retry_at`,
        or failed for good (neither)."""
        now = _now()
        values: dict[str, Any] = {"attempts": job_callbacks.c.attempts + 1}
        if error is None:
            values.update(state="delivered", delivered_at=now)
        else:
            values.update(last_error=error[:2000])
            if retry_at is None:
                values["state"] = "failed"
            else:
                values["next_attempt_at"] = retry_at
        with self._write() as conn:
            # Only a pending row: a late reply of a dispatcher whose hold ran out must not
            # undo a delivery another dispatcher recorded meanwhile.
            conn.execute(
                job_callbacks.update()
                .where(job_callbacks.c.id == callback_id)
                .where(job_callbacks.c.state == "pending")
                .values(**values)
            )

    def callback_counts(self, job_ids: Sequence[str]) -> dict[str, CallbackCounts]:
        """Delivery state per job: how many delivered, pending, failed; the last error."""
        if not job_ids:
            return {}
        with self._read() as conn:
            counts = conn.execute(
                sa.select(job_callbacks.c.job_id, job_callbacks.c.state, sa.func.count())
                .where(job_callbacks.c.job_id.in_(job_ids))
                .group_by(job_callbacks.c.job_id, job_callbacks.c.state)
            ).all()
            errors = conn.execute(
                sa.select(job_callbacks.c.job_id, job_callbacks.c.last_error)
                .where(job_callbacks.c.job_id.in_(job_ids))
                .where(job_callbacks.c.last_error != "")
                .order_by(job_callbacks.c.id)
            ).all()
        out: dict[str, dict[str, Any]] = {}
        for job_id, state, count in counts:
            out.setdefault(job_id, {})[state] = count
        for job_id, error in errors:
            out.setdefault(job_id, {})["last_error"] = error
        return {job_id: CallbackCounts(**fields) for job_id, fields in out.items()}

    # -- inside transactions ------------------------------------------------------------

    @staticmethod
    def _update(conn: sa.Connection, job_id: str, **values: Any) -> None:
        conn.execute(_UPDATE_JOB, {**values, "job_id": job_id})

    def _locked(self, conn: sa.Connection, job_id: str) -> JobRow | None:
        found = conn.execute(_LOCK_JOB, {"job_id": job_id}).first()
        return None if found is None else _job(found)

    def _owned(self, conn: sa.Connection, attempt: Attempt) -> JobRow | None:
        row = self._locked(conn, attempt.job_id)
        return row if row is not None and _owns(row, attempt) else None

    def _add_events(
        self, conn: sa.Connection, row: JobRow, attempt: int, events: Sequence[NewEvent]
    ) -> int:
        """Append events (and their callback deliveries) after the job's last one and
        return the job's next event seq, which the caller writes with its own update of
        the job (one statement fewer per transaction). `row` was read in this transaction
        under its lock (or is being inserted), so its `next_event_seq` is current."""
        seq = row.next_event_seq
        now = _now()
        values, deliveries = [], []
        for event in events:
            values.append(
                {
                    "job_id": row.id,
                    "seq": seq,
                    "at": now,
                    "attempt": attempt,
                    "type": event.type,
                    "state": event.state,
                    "reason": event.reason,
                    "data": dict(event.data or {}),
                }
            )
            if row.callback_url:
                deliveries.extend(self._deliveries(row, values[-1]))
            seq += 1
        conn.execute(_INSERT_EVENTS, values)
        if deliveries:
            conn.execute(_INSERT_CALLBACKS, deliveries)
        return seq

    @staticmethod
    def _deliveries(row: JobRow, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The callback POSTs an event makes: itself, plus `done` or `error` when it
        ends the job (the names receivers of Plue-style callbacks expect)."""
        payloads = []
        base = {"job_id": row.id, "attempt": event["attempt"], "at": event["at"].isoformat()}
        kind = event["type"]
        payloads.append(
            {
                **base,
                "type": kind,
                "seq": event["seq"],
                "state": event["state"],
                "reason": event["reason"],
                "data": event["data"],
            }
        )
        if kind == "state" and event["state"] in JOB_FINAL_STATES:
            final = "done" if event["state"] == "succeeded" else "error"
            payloads.append({**payloads[0], "type": final})
        return [
            {
                "job_id": row.id,
                "event_seq": event["seq"],
                "critical": p["type"] in CRITICAL_EVENTS,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": event["at"],
                "last_error": "",
                "payload": p,
                "delivered_at": None,
            }
            for p in payloads
        ]
