"""Metric rings of one sandbox: its resource use at three resolutions, in memory.

Every sample (normally each 5 s) becomes a point of the finest ring; the coarser rings
get one point per N samples that *aggregates* them (mean CPU and memory, max peak and
processes), so a 10-minute point says what the ten minutes were like, not what one
moment was. Points go to the store before the sandbox pauses or dies; after that the
store serves them.

    range  step (at 5 s sampling)  points
    10m    5 s                     120
    2h     60 s                    120
    24h    10 min                  144
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from corral.errors import InvalidRequest
from corral.isolation import Usage
from corral.store import MetricPoint, Store

Range = Literal["10m", "2h", "24h"]
# range -> (samples per point, points kept)
RESOLUTIONS: dict[str, tuple[int, int]] = {"10m": (1, 120), "2h": (12, 120), "24h": (120, 144)}


def check_range(value: str) -> str:
    if value not in RESOLUTIONS:
        raise InvalidRequest(f"metrics range {value!r} is unknown; use one of 10m, 2h, 24h")
    return value


def aggregate(points: list[MetricPoint]) -> MetricPoint:
    """One point for a run of consecutive points, stamped with the last one's time."""
    n = len(points)
    return MetricPoint(
        at=points[-1].at,
        cpu_percent=sum(p.cpu_percent for p in points) / n,
        memory_bytes=round(sum(p.memory_bytes for p in points) / n),
        memory_peak_bytes=max(p.memory_peak_bytes for p in points),
        pids=max(p.pids for p in points),
    )


@dataclass
class Ring:
    """Points of one resolution: the last `capacity` ones, and the run being aggregated."""

    resolution: str
    per_point: int
    capacity: int
    points: deque[MetricPoint] = field(default_factory=deque)
    pending: list[MetricPoint] = field(default_factory=list)
    # Time of the newest point already in the store.
    flushed_until: datetime | None = None

    def add(self, sample: MetricPoint) -> None:
        self.pending.append(sample)
        if len(self.pending) >= self.per_point:
            self.points.append(aggregate(self.pending))
            self.pending.clear()
            while len(self.points) > self.capacity:
                self.points.popleft()

    def series(self) -> list[MetricPoint]:
        """The ring's points and, last, the run so far: a young sandbox has points too."""
        return [*self.points, *([aggregate(self.pending)] if self.pending else [])]

    def unflushed(self, *, final: bool) -> list[MetricPoint]:
        points = self.series() if final else list(self.points)
        if self.flushed_until is not None:
            points = [p for p in points if p.at > self.flushed_until]
        return points


class MetricRings:
    """The three rings of one sandbox and the CPU baseline their points are computed from."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.rings = {
            name: Ring(name, per_point, capacity)
            for name, (per_point, capacity) in RESOLUTIONS.items()
        }
        self._baseline: tuple[float, float] | None = None  # (monotonic time, cpu seconds)

    def baseline(self, usage: Usage | None, now: float) -> None:
        """Start measuring CPU from here (creation, resume); None forgets the baseline."""
        self._baseline = None if usage is None else (now, usage.cpu_seconds)

    def sample(
        self, usage: Usage, at: datetime, now: float, *, min_gap: float = 0.0
    ) -> MetricPoint | None:
        """Add one sample; `now` is monotonic. The first one only sets the baseline.

        A sample less than `min_gap` after the previous one is dropped: a point over a
        sliver of time would say little and break the rings' even steps.
        """
        previous = self._baseline
        if previous is not None and now - previous[0] < max(min_gap, 1e-9):
            return None
        self._baseline = (now, usage.cpu_seconds)
        if previous is None:
            return None
        cpu = max(0.0, (usage.cpu_seconds - previous[1]) / (now - previous[0]) * 100)
        point = MetricPoint(at, cpu, usage.memory_bytes, usage.memory_peak_bytes, usage.pids)
        for ring in self.rings.values():
            ring.add(point)
        return point

    def series(self, resolution: str) -> list[MetricPoint]:
        return self.rings[check_range(resolution)].series()

    def keep(self, resolution: str) -> timedelta:
        per_point, capacity = RESOLUTIONS[resolution]
        return timedelta(seconds=self.interval * per_point * capacity)

    def flush(self, store: Store, sandbox_id: str, *, final: bool) -> int:
        """Write points not yet stored; `final` also writes each ring's unfinished run.

        Returns how many points were written.
        """
        written = 0
        for name, ring in self.rings.items():
            points = ring.unflushed(final=final)
            if points:
                store.add_metric_points(sandbox_id, name, points, keep=self.keep(name))
                ring.flushed_until = points[-1].at
                written += len(points)
        return written


def stored_series(store: Store, sandbox_id: str, resolution: str) -> list[MetricPoint]:
    """What the store kept of a sandbox that is no longer live."""
    return store.metric_points(
        sandbox_id, check_range(resolution), limit=RESOLUTIONS[resolution][1]
    )
