"""`GET /metrics`: the process's Prometheus metrics (`corral.instruments`), with the
store's gauges read at scrape time, and the keyless metrics listener (`--metrics-port`).

Who may scrape the API port is `Settings.metrics`: `auth` (the default) takes a key of
the default team, the operator's, sent as `Authorization: Bearer <key>` (Prometheus's
`authorization: {credentials_file: …}`); `on` takes anyone (an API port on a private
network); `off` answers 404. The series carry no team or sandbox ids, but they count
every team's activity, so a tenant's key is refused: with `auth`, only the operator sees
how busy the server is. `metrics_port` serves the same series without a key on a port
of its own (loopback by default), for a Prometheus that should not hold an API key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from corral import instruments
from corral.config import Settings
from corral.errors import Forbidden, Unauthenticated
from corral.server.auth import authenticate_headers
from corral.server.base import Services
from corral.store.teams import DEFAULT_TEAM

if TYPE_CHECKING:
    from corral.server.app import Scope, Send

log = logging.getLogger("corral.server")

PATH = "/metrics"


class StoreCollector(Collector):
    """`corral_sandboxes` and `corral_jobs`: counts by state in the store, shared by every
    process on it (so the same in each process that serves them)."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def collect(self) -> Iterator[GaugeMetricFamily]:
        store = self._services.store
        if store is None:  # starting or stopping
            return
        sandboxes = GaugeMetricFamily(
            "corral_sandboxes",
            "Live sandboxes in the store (every server on it), by state and isolation tier.",
            labels=["state", "tier"],
        )
        for (state, tier), count in sorted(store.live_sandbox_counts().items()):
            sandboxes.add_metric([state, tier], count)
        yield sandboxes
        jobs = GaugeMetricFamily(
            "corral_jobs",
            "Jobs in the queue (queued, running) in the store, by state.",
            labels=["state"],
        )
        for state, count in store.queue_counts().items():
            jobs.add_metric([state], count)
        yield jobs


class MetricsEndpoint:
    """`/metrics` of one app: the process's instruments and the app's store gauges."""

    def __init__(self, settings: Settings, services: Services) -> None:
        self._settings = settings
        self._services = services
        self._registry = instruments.registry_with(StoreCollector(services))
        self._listener: instruments.MetricsListener | None = None

    def start(self) -> None:
        """Open the metrics listener, if one is asked for."""
        if self._settings.metrics_port:
            host, port = self._settings.metrics_host, self._settings.metrics_port
            self._listener = instruments.MetricsListener(host, port, self._registry)
            url = f"http://{host}:{self._listener.port}/metrics"
            log.info("metrics served", extra={"url": url})

    @property
    def port(self) -> int | None:
        """The metrics listener's port (None: none is open)."""
        return None if self._listener is None else self._listener.port

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def serve(self, scope: Scope, send: Send) -> None:
        mode = self._settings.metrics
        if mode == "off":
            await _send(send, 404, _problem("not_found", _OFF))
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _send(send, 405, _problem("invalid_argument", "use GET /metrics"))
            return
        if mode == "auth":
            refusal = self._refusal(dict(scope.get("headers", ())))
            if refusal is not None:
                await _send(send, *refusal)
                return
        body, content_type = instruments.exposition(self._registry)
        await _send(send, 200, body, content_type)

    def _refusal(self, headers: dict[bytes, bytes]) -> tuple[int, bytes] | None:
        if self._services.store is None:
            return 503, _problem("unavailable", "the server is starting; scrape again")
        try:
            team = authenticate_headers(self._services, headers.get(b"authorization", b"").decode())
        except Unauthenticated as exc:
            return 401, _problem("unauthenticated", f"{exc} ({_WHICH_KEY})")
        if team.name != DEFAULT_TEAM:
            return 403, _problem("permission_denied", str(Forbidden(_WHICH_KEY)))
        return None


_WHICH_KEY = (
    f"/metrics takes a key of the {DEFAULT_TEAM!r} team (the server's default.key), or "
    "none when the server runs with CORRAL_METRICS=on; CORRAL_METRICS_PORT serves them "
    "without a key on a port of their own"
)
_OFF = (
    "metrics are off on this port (CORRAL_METRICS=off); CORRAL_METRICS_PORT serves them "
    "on a port of their own"
)


def _problem(code: str, message: str) -> bytes:
    return json.dumps({"code": code, "message": message}).encode()


async def _send(
    send: Send, status: int, body: bytes, content_type: str = "application/json"
) -> None:
    headers: list[tuple[bytes, bytes]] = [(b"content-type", content_type.encode())]
    start: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
