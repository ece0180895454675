"""Job log files: the bulk of each job's output, one append-only file per job.

A job's log rows (`job_logs`) keep their order, attempt, step and stream; past a job's
first bytes, a row's bytes are in the job's file here and the row says where (offset,
size). So the database stays small however much jobs print, and deleting a job's logs
is one unlink.

The files live beside the SQLite database, so every process that opens that database
(`corral server`, `corral worker`s on the same host) finds them. A store on PostgreSQL
keeps every byte in the rows: its workers may run on other hosts, which would need a
shared blob store (not done yet).

Durability matches the database's: bytes are written (into the page cache) before the
row that points at them is committed, and neither is fsynced per write (SQLite runs
with synchronous=NORMAL), so an acknowledged chunk survives a crash of the process. A
power loss may cut a file short under rows that survived; readers then get the bytes
that are there.

A file goes with its job: the retention sweep (`JobStore.delete_finished_jobs`) unlinks
it with the rows. Whatever else deletes jobs must too (Corral deletes teams nowhere yet;
a database-level cascade from a team would leave its jobs' files behind).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# Job ids are generated ("j" and hex); anything else must never become a path.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class LogFiles:
    """The directory of job log files: append, read ranges, delete."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} cannot name a log file")
        return self.root / f"{job_id}.log"

    def append(self, job_id: str, data: bytes) -> int:
        """Append `data` to the job's file; the offset it starts at.

        The caller holds the job's row locked (the database's write lock on SQLite), so
        no other process appends to this file meanwhile. Bytes a failed transaction
        wrote stay in the file, unreferenced: the next append starts after them.
        """
        path = self.path(job_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, flags, 0o600)
        try:
            offset = os.fstat(fd).st_size
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return offset

    def read(self, job_id: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes at each (offset, size) of the job's file; FileNotFoundError when
        the job's logs were deleted."""
        fd = os.open(self.path(job_id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [os.pread(fd, size, offset) for offset, size in ranges]
        finally:
            os.close(fd)

    def delete(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            self.path(job_id).unlink(missing_ok=True)
