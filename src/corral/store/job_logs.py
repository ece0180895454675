"""A job's output in the store: log chunks written under the attempt's lease, read in order.

Logs are bounded three ways: per job (the worker's log limit), per team (its
`max_log_mib`, against a running total kept with every write), and by age (finished
jobs are deleted after the retention period, their logs with them). Past a job's first
`INLINE_LOG_BYTES`, its output goes to its log file (`corral.store.logfiles`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from corral.errors import NotFound
from corral.store.database import unread
from corral.store.job_rows import Attempt, JobRow, JobRows, NewEvent, owns, utcnow
from corral.store.logfiles import LogFiles
from corral.store.schema import job_logs, jobs, teams

# A job's first bytes of output stay in its log rows (most jobs print less than this and
# need no file); the rest goes to its log file when the store has one (SQLite).
INLINE_LOG_BYTES = 16 * 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class LogChunkRow:
    job_id: str
    seq: int
    attempt: int
    step: int
    stream: int  # 1 stdout, 2 stderr
    data: bytes
    at: datetime


_INSERT_LOGS = unread(job_logs.insert())
# A log write reads (and locks) the job with its team's quota and total in one statement.
_LOCK_JOB_AND_TEAM_LOGS = (
    sa.select(jobs, teams.c.max_log_mib, teams.c.log_bytes.label("team_log_bytes"))
    .join(teams, teams.c.id == jobs.c.team_id)
    .where(jobs.c.id == sa.bindparam("job_id"))
    .with_for_update()
)
ADD_TEAM_LOGS = unread(
    teams.update()
    .where(teams.c.id == sa.bindparam("team_id"))
    .values(log_bytes=teams.c.log_bytes + sa.bindparam("added"))
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


class JobLogStore(JobRows):
    """Job output: appended by the running attempt within its bounds, read by seq."""

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

    def append_logs(
        self, attempt: Attempt, chunks: Sequence[tuple[int, int, bytes]], limit: int
    ) -> tuple[bool, int]:
        """Store output chunks (step, stream, data) of a running attempt, in order, up to
        the job's log limit of `limit` bytes and its team's log quota (`max_log_mib`).

        Returns (still the owner, bytes dropped by the limit or the quota). The first
        time output is dropped the job is marked truncated and a `log_truncated` event
        says which bound did it; the job goes on.
        """
        now = utcnow()
        with self._write() as conn:
            found = conn.execute(_LOCK_JOB_AND_TEAM_LOGS, {"job_id": attempt.job_id}).first()
            if found is None:
                return False, 0
            fields = found._asdict()
            quota_mib, team_used = fields.pop("max_log_mib"), fields.pop("team_log_bytes")
            row = JobRow(**fields)
            if not owns(row, attempt):
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
                conn.execute(ADD_TEAM_LOGS, {"team_id": row.team_id, "added": used - row.log_bytes})
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

    def team_log_bytes(self, team_id: str) -> int:
        """The bytes of job logs the team's jobs keep (what its log quota bounds)."""
        with self._read() as conn:
            used = conn.execute(
                sa.select(teams.c.log_bytes).where(teams.c.id == team_id)
            ).scalar_one_or_none()
        return int(used or 0)
