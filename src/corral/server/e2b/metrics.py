"""`GET /sandboxes/{sandboxID}/metrics?start=&end=`: E2B's metrics from Corral's rings.

Corral samples each sandbox every `metrics_interval` (5 s; `corral.sandboxes.metrics`),
so the first point comes one interval after creation. E2B's fields are filled from a
point and the sandbox's limits: `cpuUsedPct` is of the sandbox's cores (Corral's
`cpu_percent` is of one core), `memTotal` and `diskTotal` are its limits. Corral does not
measure disk use or page cache per sample: `diskUsed` and `memCache` are 0.
"""

from __future__ import annotations

import math
import time
from datetime import UTC
from typing import TYPE_CHECKING, Any, Literal

from corral.errors import InvalidRequest, ServerUnavailable
from corral.server.e2b.rest import RestRequest, RestResponse, Route

if TYPE_CHECKING:
    from corral.server.base import Services
    from corral.store import MetricPoint

MIB = 1024 * 1024


def _seconds(raw: str | None, name: str, default: float) -> float:
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise InvalidRequest(f"{name}={raw!r} must be a Unix time in whole seconds")
    return float(raw)


def _resolution(start: float, now: float) -> Literal["10m", "2h", "24h"]:
    """The finest ring that reaches back to `start`."""
    age = now - start
    return "10m" if age <= 600 else "2h" if age <= 7200 else "24h"


async def sandbox_metrics(services: Services, req: RestRequest) -> RestResponse:
    """The sandbox's points from `start` (default: its creation) to `end` (default: now),
    both Unix seconds and inclusive; none for a range before it existed."""
    manager = services.manager
    if manager is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    sandbox_id = req.params["sandboxID"]
    record = await manager.get(req.team, sandbox_id)  # NotFound: 404
    now = time.time()
    start = _seconds(req.arg("start"), "start", record.created_at.timestamp())
    end = _seconds(req.arg("end"), "end", now)
    if start > end:
        raise InvalidRequest(f"start={start:.0f} is after end={end:.0f}")
    points = await manager.metrics(req.team, sandbox_id, _resolution(start, now))
    limits = record.limits
    cores = max(1, math.ceil(limits.cpu))
    # `end` is in whole seconds: a point later in that second is inside it.
    chosen = [p for p in points if start <= p.at.timestamp() < end + 1]
    body = [_metric(p, cores, limits.cpu, limits.memory_mib, limits.disk_mib) for p in chosen]
    return RestResponse(200, body)


def _metric(
    point: MetricPoint, cores: int, cpu: float, memory_mib: int, disk_mib: int
) -> dict[str, Any]:
    at = point.at.astimezone(UTC)
    return {
        "timestamp": at.isoformat().replace("+00:00", "Z"),
        "timestampUnix": int(at.timestamp()),
        "cpuCount": cores,
        "cpuUsedPct": round(min(100.0, point.cpu_percent / cpu), 2),
        "memUsed": point.memory_bytes,
        "memTotal": memory_mib * MIB,
        "memCache": 0,
        "diskUsed": 0,
        "diskTotal": disk_mib * MIB,
    }


ROUTES = [Route("GET", "/sandboxes/{sandboxID}/metrics", sandbox_metrics)]
