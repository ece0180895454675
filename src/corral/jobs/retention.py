"""Retention: finished jobs are deleted, with their events and logs, once they are older
than `Settings.job_retention` seconds.

Every process that runs a `JobRuntime` sweeps (sweeps of several processes only split
the work). A sweep deletes in batches of `BATCH_JOBS` jobs, each batch its own short
transaction run off the event loop, so it never holds the write lock long nor stalls
the loop's heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from corral._aio import stop_tasks
from corral.errors import InvalidRequest
from corral.store import Store

log = logging.getLogger("corral.jobs")

SWEEP_SECONDS = 60.0
BATCH_JOBS = 50


class Retention:
    """Deletes finished jobs older than `seconds` (0: never), every sweep period."""

    def __init__(self, store: Store, seconds: int) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
            raise InvalidRequest(
                f"CORRAL_JOB_RETENTION={seconds!r} must be a whole number of seconds >= 0 "
                "(0 keeps finished jobs forever)"
            )
        self.store = store
        self.seconds = seconds
        # Often enough that a job outlives its retention by at most half of it.
        self.period = min(SWEEP_SECONDS, max(0.5, seconds / 2))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.seconds > 0:
            self._task = asyncio.create_task(self._loop(), name="job-retention")

    async def aclose(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)
            self._task = None

    async def sweep(self) -> int:
        """Delete every job past its retention now; how many went."""
        before = datetime.now(UTC) - timedelta(seconds=self.seconds)
        total = 0
        while True:
            deleted = await asyncio.to_thread(self.store.delete_finished_jobs, before, BATCH_JOBS)
            total += deleted
            if deleted < BATCH_JOBS:
                break
        if total:
            log.info("finished jobs deleted", extra={"jobs": total, "retention_s": self.seconds})
        return total

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("deleting old jobs failed; trying again")
            await asyncio.sleep(self.period)
