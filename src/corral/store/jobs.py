"""The job queue in SQL: submitting and reading jobs, ending attempts, cancel and retry,
lease expiry and retention.

The store is split along its seams: the rows and the transaction every change goes
through (`corral.store.job_rows`), claims under lease (`corral.store.claims`), log
chunks (`corral.store.job_logs`) and the callback outbox
(`corral.store.callback_outbox`); `JobStore` joins them. Which change a job goes
through, and when, is `corral.lifecycle`'s to say; this module writes it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from corral.errors import IdempotencyConflict
from corral.job_lifecycle import (
    cancel_action,
    may_retry_by_request,
    on_release,
    unspent,
)
from corral.states import JOB_FINAL_STATES
from corral.store.callback_outbox import CallbackOutbox
from corral.store.claims import JobClaims
from corral.store.database import unread
from corral.store.job_logs import ADD_TEAM_LOGS, JobLogStore
from corral.store.job_rows import (
    JOBS_QUEUED,
    SELECT_JOB,
    Attempt,
    JobEventRow,
    JobRow,
    NewEvent,
    job_row,
    utcnow,
)
from corral.store.network_events import NetworkEventStore
from corral.store.pages import decode_token, encode_token
from corral.store.schema import job_callbacks, job_events, job_logs, jobs, network_events

_INSERT_JOB = unread(jobs.insert())


def _canonical(spec: Mapping[str, Any]) -> str:
    """A spec as JSON with sorted keys: equal for equal specs, before and after the store."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


class JobStore(JobClaims, JobLogStore, CallbackOutbox, NetworkEventStore):
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
                    first = job_row(earlier)
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
            self.notify(conn, JOBS_QUEUED)
            return inserted, True

    def job(self, job_id: str) -> JobRow | None:
        with self._read() as conn:
            found = conn.execute(SELECT_JOB, {"job_id": job_id}).first()
        return None if found is None else job_row(found)

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
            rows = [job_row(r) for r in conn.execute(query)]
        if len(rows) > page_size:
            rows = rows[:page_size]
            return rows, encode_token(rows[-1].created_at, rows[-1].id)
        return rows, ""

    def job_events(self, job_id: str, offset: int = 0, limit: int = 1000) -> list[JobEventRow]:
        """A job's events from seq `offset`, in order: its own and its sandboxes' network
        events, which share its seqs (a seq whose network event the cap removed is skipped)."""
        rows = [JobEventRow(**r) for r in self._from_seq(job_events, job_id, offset, limit)]
        network = self.job_network_events(job_id, offset, limit)
        if network:
            rows = sorted(rows + network, key=lambda row: row.seq)[:limit]
        return rows

    # -- workers ------------------------------------------------------------------------

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
        now = utcnow()
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
        now = utcnow()
        with self._write() as conn:
            row = self._owned(conn, attempt)
            if row is None:
                return None
            move = on_release(row.cancel_reason, reason)
            state, text = move.state, move.reason
            events = [NewEvent("state", text, state)]
            requeued = not move.final
            if requeued and not started:
                events.insert(0, NewEvent("requeued", reason, None, data))
            changes: dict[str, Any] = dict(
                state=state,
                state_reason=text,
                lease_expires_at=None,
                run_after=run_after or now,
                attempt=row.attempt - (not started),
                max_attempts=unspent(row.max_attempts)
                if requeued and started
                else row.max_attempts,
                finished_at=now if move.final else None,
                updated_at=now,
                next_event_seq=self._add_events(conn, row, attempt.attempt, events),
            )
            self._update(conn, attempt.job_id, **changes)
            return replace(row, **changes)

    def make_due(self, job_id: str) -> None:
        """A queued job waiting for its run_after may be claimed now (room was freed)."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .where(jobs.c.state == "queued")
                .where(jobs.c.run_after > now)
                .values(run_after=now)
            )
            self.notify(conn, JOBS_QUEUED)

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

    # -- requests -----------------------------------------------------------------------

    def cancel_job(self, job_id: str, reason: str) -> JobRow | None:
        """A queued job is canceled now; a running one is marked for its worker, which
        kills it at its next heartbeat (or at once, in the same process)."""
        now = utcnow()
        with self._write() as conn:
            row = self._locked(conn, job_id)
            if row is None:
                return None
            changes: dict[str, Any] = {}
            action = cancel_action(row.state, row.cancel_reason is not None)
            if action == "cancel":
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
            elif action == "mark":
                changes = dict(cancel_reason=reason, updated_at=now)
            if changes:
                self._update(conn, job_id, **changes)
            return replace(row, **changes)

    def retry_job(self, job_id: str) -> JobRow | None:
        """Queue a finished job again for one more attempt; None if unknown. A job that
        is not finished is returned unchanged (the caller says why)."""
        now = utcnow()
        with self._write() as conn:
            row = self._locked(conn, job_id)
            if row is None or not may_retry_by_request(row.state):
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
            for table in (job_logs, job_events, job_callbacks, network_events):
                conn.execute(table.delete().where(table.c.job_id.in_(ids)))
            conn.execute(jobs.delete().where(jobs.c.id.in_(ids)))
            freed: Counter[str] = Counter()
            for r in found:
                freed[r.team_id] += r.log_bytes
            for team_id, size in freed.items():
                if size:
                    conn.execute(ADD_TEAM_LOGS, {"team_id": team_id, "added": -size})
            if self._log_files is not None:
                self._log_files.delete(ids)
        return len(ids)
