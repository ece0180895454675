"""Job rows and the transactions every change of a job goes through.

Every change of a job's state is one transaction with its event (and, when the job has a
callback URL, the event's delivery in the outbox), so what a reader sees has been
written. Writes from a worker name the attempt they belong to (`Attempt`) and change
nothing once that attempt has lost its lease, so a worker that comes back from the dead
cannot overwrite its successor. The rules that say which change happens when live in
`corral.lifecycle`; this module only writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from corral.job_lifecycle import is_final
from corral.store.callback_outbox import CALLBACKS_DUE, deliveries
from corral.store.database import Database, unread
from corral.store.schema import job_callbacks, job_events, jobs

# What a job's changes say to other processes' waiters (`corral.store.notifications`),
# sent by the transactions below, so no change can forget its wake-up.
# A job is queued or due now, or one ended (a slot of its team's is free): workers claim.
JOBS_QUEUED = "queued"
JOB_CHANGED = "changed"  # payload: the job's id; it has new logs, events or state
JOB_CANCELED = "cancel"  # payload: the job's id; its cancel was asked (its worker stops it)


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
    traceparent: str | None

    @property
    def final(self) -> bool:
        return is_final(self.state)

    @classmethod
    def queued(
        cls,
        *,
        id: str,
        team_id: str,
        kind: str,
        template: str,
        isolation: str,
        memory_mib: int,
        spec: dict[str, Any],
        labels: dict[str, str],
        priority: int,
        max_attempts: int,
        now: datetime,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        callback_secret: str | None = None,
        traceparent: str | None = None,
    ) -> JobRow:
        """A job as it is first stored: queued now, no attempt yet, nothing logged."""
        return cls(
            id=id,
            team_id=team_id,
            idempotency_key=idempotency_key,
            kind=kind,
            template=template,
            isolation=isolation,
            memory_mib=memory_mib,
            spec=spec,
            labels=labels,
            priority=priority,
            state="queued",
            state_reason="queued",
            attempt=0,
            max_attempts=max_attempts,
            lost_count=0,
            run_after=now,
            worker=None,
            lease_expires_at=None,
            cancel_reason=None,
            exit_code=None,
            next_log_seq=0,
            log_bytes=0,
            log_truncated=False,
            next_event_seq=0,
            callback_url=callback_url,
            callback_secret=callback_secret,
            created_at=now,
            updated_at=now,
            started_at=None,
            finished_at=None,
            traceparent=traceparent,
        )


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
class NewEvent:
    """An event to record: its type, the state it moves the job to (if any), why."""

    type: str
    reason: str = ""
    state: str | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Attempt:
    """Which attempt of which job a worker's write belongs to."""

    job_id: str
    worker: str
    attempt: int


def utcnow() -> datetime:
    """The store's clock: aware UTC."""
    return datetime.now(UTC)


# The statements of a job's hot path (claim, output, end, follow), built once: building
# and keying a statement costs SQLAlchemy ~60 µs, five times what SQLite takes to run it.
SELECT_JOB = sa.select(jobs).where(jobs.c.id == sa.bindparam("job_id"))
_LOCK_JOB = SELECT_JOB.with_for_update()
# Their writes are `unread`: on PostgreSQL they go to the server with the commit.
_UPDATE_JOB = unread(jobs.update().where(jobs.c.id == sa.bindparam("job_id")))  # SET: params
_INSERT_EVENTS = unread(job_events.insert())
_INSERT_CALLBACKS = job_callbacks.insert()


def job_row(row: sa.Row[Any]) -> JobRow:
    return JobRow(**row._asdict())


def owns(row: JobRow, attempt: Attempt) -> bool:
    """Whether `attempt` is the job's running attempt (the only one that may write)."""
    return (
        row.state == "running" and row.worker == attempt.worker and row.attempt == attempt.attempt
    )


class JobRows(Database):
    """What the job store's parts share: a job's row under lock, its update, its events."""

    def _update(self, conn: sa.Connection, job_id: str, **values: Any) -> None:
        conn.execute(_UPDATE_JOB, {**values, "job_id": job_id})
        self.notify(conn, JOB_CHANGED, job_id)
        state = values.get("state")
        if state == "queued" or (state is not None and is_final(state)):
            self.notify(conn, JOBS_QUEUED)
        if values.get("cancel_reason"):
            self.notify(conn, JOB_CANCELED, job_id)

    def _locked(self, conn: sa.Connection, job_id: str) -> JobRow | None:
        found = conn.execute(_LOCK_JOB, {"job_id": job_id}).first()
        return None if found is None else job_row(found)

    def _owned(self, conn: sa.Connection, attempt: Attempt) -> JobRow | None:
        row = self._locked(conn, attempt.job_id)
        return row if row is not None and owns(row, attempt) else None

    def _add_events(
        self, conn: sa.Connection, row: JobRow, attempt: int, events: Sequence[NewEvent]
    ) -> int:
        """Append events (and their callback deliveries) after the job's last one and
        return the job's next event seq, which the caller writes with its own update of
        the job (one statement fewer per transaction). `row` was read in this transaction
        under its lock (or is being inserted), so its `next_event_seq` is current."""
        seq = row.next_event_seq
        at = utcnow()
        values, owed = [], []
        for event in events:
            values.append(
                {
                    "job_id": row.id,
                    "seq": seq,
                    "at": at,
                    "attempt": attempt,
                    "type": event.type,
                    "state": event.state,
                    "reason": event.reason,
                    "data": dict(event.data or {}),
                }
            )
            if row.callback_url:
                owed.extend(deliveries(row.id, values[-1]))
            seq += 1
        conn.execute(_INSERT_EVENTS, values)
        self.notify(conn, JOB_CHANGED, row.id)
        if owed:
            conn.execute(_INSERT_CALLBACKS, owed)
            self.notify(conn, CALLBACKS_DUE)
        return seq

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
