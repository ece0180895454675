"""Metric points of sandboxes, kept after the in-memory rings that produced them are gone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from corral.store.database import Database
from corral.store.schema import metric_points


@dataclass(frozen=True)
class MetricPoint:
    """A sandbox's resource use over one step, stamped with the step's end."""

    at: datetime
    # Of one core, averaged over the step: 200.0 is two cores busy.
    cpu_percent: float
    memory_bytes: int
    memory_peak_bytes: int
    pids: int


class MetricStore(Database):
    """Points per sandbox and resolution ("10m", "2h", "24h")."""

    def add_metric_points(
        self,
        sandbox_id: str,
        resolution: str,
        points: Sequence[MetricPoint],
        *,
        keep: timedelta,
    ) -> None:
        """Append points (newer than those stored) and drop those older than `keep`
        before the newest."""
        if not points:
            return
        with self._write() as conn:
            conn.execute(
                metric_points.insert(),
                [
                    {
                        "sandbox_id": sandbox_id,
                        "resolution": resolution,
                        "at": p.at,
                        "cpu_percent": p.cpu_percent,
                        "memory_bytes": p.memory_bytes,
                        "memory_peak_bytes": p.memory_peak_bytes,
                        "pids": p.pids,
                    }
                    for p in points
                ],
            )
            conn.execute(
                metric_points.delete()
                .where(metric_points.c.sandbox_id == sandbox_id)
                .where(metric_points.c.resolution == resolution)
                .where(metric_points.c.at <= max(p.at for p in points) - keep)
            )

    def metric_points(self, sandbox_id: str, resolution: str, *, limit: int) -> list[MetricPoint]:
        """The newest `limit` points, oldest first."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(
                    metric_points.c.at,
                    metric_points.c.cpu_percent,
                    metric_points.c.memory_bytes,
                    metric_points.c.memory_peak_bytes,
                    metric_points.c.pids,
                )
                .where(metric_points.c.sandbox_id == sandbox_id)
                .where(metric_points.c.resolution == resolution)
                .order_by(metric_points.c.at.desc())
                .limit(limit)
            ).all()
        return [MetricPoint(**r._asdict()) for r in reversed(found)]
