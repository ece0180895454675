"""What the job service returns: a job as its callers see it, not as the store keeps it.

A `JobRecord` carries the parsed spec, the log limit its output was held to and the state
of its callback deliveries, and leaves out what is the queue's own (leases, event and log
seqs, the callback secret, lost-worker counts). The API renders these (`server/jobs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from corral.job_lifecycle import is_final
from corral.jobs.spec import JobSpec
from corral.store.callback_outbox import CallbackCounts
from corral.store.job_rows import JobRow


@dataclass(frozen=True)
class CallbackStatus:
    """A job's callback URL and how its deliveries stand."""

    url: str
    delivered: int
    pending: int
    failed: int
    last_error: str


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: str
    state_reason: str
    spec: JobSpec
    attempt: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    exit_code: int | None
    log_bytes: int
    log_truncated: bool
    log_limit_bytes: int
    idempotency_key: str | None
    run_after: datetime | None  # queued: not claimed before this (a retry's backoff)
    callback: CallbackStatus | None

    @property
    def final(self) -> bool:
        return is_final(self.state)

    @classmethod
    def from_row(cls, row: JobRow, callbacks: CallbackCounts | None, log_limit: int) -> JobRecord:
        counts = callbacks or CallbackCounts()
        return cls(
            id=row.id,
            state=row.state,
            state_reason=row.state_reason,
            spec=JobSpec.from_dict(row.spec),
            attempt=row.attempt,
            max_attempts=row.max_attempts,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            worker=row.worker,
            exit_code=row.exit_code,
            log_bytes=row.log_bytes,
            log_truncated=row.log_truncated,
            log_limit_bytes=log_limit,
            idempotency_key=row.idempotency_key,
            run_after=row.run_after if row.state == "queued" else None,
            callback=None
            if not row.callback_url
            else CallbackStatus(
                url=row.callback_url,
                delivered=counts.delivered,
                pending=counts.pending,
                failed=counts.failed,
                last_error=counts.last_error,
            ),
        )
