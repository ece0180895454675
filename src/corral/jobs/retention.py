"""Retention: what the store would otherwise keep forever is deleted by age.

- finished jobs, with their events, logs (rows and files) and callback deliveries,
  `Settings.job_retention` seconds after they end;
- ended (killed or failed) sandboxes, with their state events, metric points and network
  events, `sandbox_retention` seconds after they end;
- sandbox state events and sandboxes' network events older than `event_retention`, and
  metric points older than `metric_retention`, whatever the sandbox (a long-lived one
  keeps its recent history).

An age of 0 keeps that kind forever. Job logs are bounded by size too, as they are
written: per job (`job_log_limit`) and per team (its `max_log_mib`).

Every process that runs a `JobRuntime` sweeps (sweeps of several processes only split
the work). A sweep deletes in batches, each its own short transaction run off the event
loop, with a pause between them: it never holds the write lock long nor stalls the
loop, and requests' own writes get the lock between batches however big the backlog.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.store import Store

log = logging.getLogger("corral.jobs")

SWEEP_SECONDS = 60.0
# Jobs and sandboxes per batch (each with its rows of events, logs, points).
BATCH_JOBS = 50
# Rows per batch of events and metric points.
BATCH_ROWS = 1000
# Between two batches: the lock is free for others' writes meanwhile.
PAUSE_SECONDS = 0.05


def _checked(variable: str, seconds: Any) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
        raise InvalidRequest(
            f"{variable}={seconds!r} must be a whole number of seconds >= 0 (0 keeps them forever)"
        )
    return seconds


class Retention:
    """Deletes what is older than its retention (0: never), every sweep period."""

    def __init__(
        self,
        store: Store,
        seconds: int,
        *,
        sandbox_seconds: int = 0,
        event_seconds: int = 0,
        metric_seconds: int = 0,
        batch_parents: int = BATCH_JOBS,
        batch_rows: int = BATCH_ROWS,
        pause: float = PAUSE_SECONDS,
    ) -> None:
        self.store = store
        self.seconds = _checked("CORRAL_JOB_RETENTION", seconds)
        # (what, age in seconds, the store's delete of one batch, batch size)
        self._kinds: list[tuple[str, int, Callable[[datetime, int], int], int]] = [
            ("jobs", self.seconds, store.delete_finished_jobs, batch_parents),
            (
                "sandboxes",
                _checked("CORRAL_SANDBOX_RETENTION", sandbox_seconds),
                store.delete_ended_sandboxes,
                batch_parents,
            ),
            (
                "sandbox_events",
                _checked("CORRAL_EVENT_RETENTION", event_seconds),
                store.delete_old_sandbox_events,
                batch_rows,
            ),
            ("network_events", event_seconds, store.delete_old_network_events, batch_rows),
            (
                "metric_points",
                _checked("CORRAL_METRIC_RETENTION", metric_seconds),
                store.delete_old_metric_points,
                batch_rows,
            ),
        ]
        self.pause = pause
        self.batches = 0  # batches run so far (a big backlog takes several)
        ages = [age for _, age, _, _ in self._kinds if age > 0]
        # Often enough that a row outlives its retention by at most half of it.
        self.period = min(SWEEP_SECONDS, max(0.5, min(ages) / 2)) if ages else SWEEP_SECONDS
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, store: Store, settings: Settings) -> Retention:
        return cls(
            store,
            settings.job_retention,
            sandbox_seconds=settings.sandbox_retention,
            event_seconds=settings.event_retention,
            metric_seconds=settings.metric_retention,
        )

    def start(self) -> None:
        if any(age > 0 for _, age, _, _ in self._kinds):
            self._task = asyncio.create_task(self._loop(), name="retention")

    async def aclose(self) -> None:
        if self._task is not None:
            await stop_tasks(self._task)
            self._task = None

    async def sweep(self) -> int:
        """Delete everything past its retention now; how many jobs, sandboxes and rows
        went."""
        now = datetime.now(UTC)
        total = 0
        for what, age, delete, batch in self._kinds:
            if age <= 0:
                continue
            before = now - timedelta(seconds=age)
            deleted = 0
            while True:
                if self.batches:
                    await asyncio.sleep(self.pause)
                count = await asyncio.to_thread(delete, before, batch)
                self.batches += 1
                deleted += count
                if count < batch:
                    break
            if deleted:
                log.info("old rows deleted", extra={"kind": what, "count": deleted, "age_s": age})
            total += deleted
        return total

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("deleting old rows failed; trying again")
            await asyncio.sleep(self.period)
