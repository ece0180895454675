"""The callback outbox: the POSTs a job's events owe its callback URL, and their delivery.

A delivery row is written in the transaction of the event it carries
(`deliveries`, called by `corral.store.job_rows`), so an event a reader sees has its
callback owed, and says so on `CALLBACKS_DUE` (`corral.store.notifications`); the
dispatcher (`corral.jobs.callbacks`) claims due rows for a while, sends them, and records
each attempt here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from corral.job_lifecycle import is_final
from corral.store.database import Database
from corral.store.schema import job_callbacks, jobs

# Events whose callback is retried (up to CALLBACK_ATTEMPTS); others are tried once.
CRITICAL_EVENTS = ("done", "error", "step_end")
CALLBACK_ATTEMPTS = 10
# What a transaction that owes deliveries says on commit: to this process's dispatcher and,
# on PostgreSQL, to every other's.
CALLBACKS_DUE = "callbacks"


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


def deliveries(job_id: str, event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The callback POSTs an event makes: itself, plus `done` or `error` when it
    ends the job (the names receivers of Plue-style callbacks expect)."""
    payloads = []
    base = {"job_id": job_id, "attempt": event["attempt"], "at": event["at"].isoformat()}
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
    if kind == "state" and is_final(event["state"]):
        final = "done" if event["state"] == "succeeded" else "error"
        payloads.append({**payloads[0], "type": final})
    return [
        {
            "job_id": job_id,
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


class CallbackOutbox(Database):
    """Callback deliveries: which are due, claiming them, recording attempts, counts."""

    def due_callback_jobs(self, limit: int, exclude: Sequence[str] = ()) -> list[DueCallbacks]:
        """Jobs with deliveries due now, the one waiting longest first, unclaimed: what a
        dispatcher chooses from (`exclude`: the jobs it is sending already)."""
        first = sa.func.min(job_callbacks.c.id).label("first")
        query = (
            sa.select(job_callbacks.c.job_id, jobs.c.team_id, jobs.c.callback_url, first)
            .join(jobs, jobs.c.id == job_callbacks.c.job_id)
            .where(job_callbacks.c.state == "pending")
            .where(job_callbacks.c.next_attempt_at <= datetime.now(UTC))
            .group_by(job_callbacks.c.job_id, jobs.c.team_id, jobs.c.callback_url)
            .order_by(first)
            .limit(limit)
        )
        if exclude:
            query = query.where(job_callbacks.c.job_id.not_in(list(exclude)))
        with self._read() as conn:
            return [DueCallbacks(r.job_id, r.team_id, r.callback_url) for r in conn.execute(query)]

    def next_callback_due(self, after: datetime) -> datetime | None:
        """When the first pending delivery due later than `after` comes due (a retry's
        backoff, a claim's hold running out): what no notification announces."""
        with self._read() as conn:
            return conn.execute(
                sa.select(sa.func.min(job_callbacks.c.next_attempt_at))
                .where(job_callbacks.c.state == "pending")
                .where(job_callbacks.c.next_attempt_at > after)
            ).scalar()

    def due_callbacks(
        self, limit: int, hold: float, job_ids: Sequence[str] | None = None
    ) -> list[CallbackRow]:
        """Claim pending deliveries that are due (with `job_ids`: theirs, up to `limit`
        per job), oldest first: each is held for `hold` seconds (its next attempt moves
        past that), so another process does not send it meanwhile."""
        now = datetime.now(UTC)
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
        now = datetime.now(UTC)
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
