"""Prometheus instruments: what every layer of a Corral process counts and times, in one
registry that `GET /metrics` (the server) and the metrics listener (`--metrics-port`,
the server's and `corral worker`'s) expose. docs/metrics.md lists every series.

    instruments.SANDBOX_CREATES.labels(tier="namespace", how="warm").inc()
    body, content_type = instruments.exposition()

Names start with `corral_` and carry their unit (`_seconds`, `_total`); labels take a
few values each (tiers, states, outcomes, error classes), never a sandbox, job or team
id, so the number of series stays bounded however many sandboxes run. The values are
this process's: counters start at zero when it starts. Gauges read from elsewhere at
scrape time are collectors: the warm pools' (`corral.sandboxes.observe`) are in the
registry; a server's store gauges (`corral.server.metrics`) are added to what that
server serves (`registry_with`).

This module imports nothing of Corral's but its errors, so any layer may record into it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from corral.errors import InvalidRequest

__all__ = [
    "CALLBACK_DELIVERIES",
    "EXEC_DURATION",
    "EXEC_START",
    "JOB_ATTEMPTS",
    "JOB_DURATION",
    "POOL_CLAIMS",
    "REGISTRY",
    "SANDBOX_CREATES",
    "SANDBOX_CREATE_DURATION",
    "SANDBOX_CREATE_FAILURES",
    "STORE_TRANSACTION",
    "MetricsListener",
    "exposition",
    "registry_with",
]

# No `<name>_created` series beside each counter and histogram: they double what a scrape
# carries and Prometheus's text format does not need them (a reset shows as a drop).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Corral's own registry, not prometheus-client's global one: only what is listed in
# docs/metrics.md is served, whatever libraries imported beside Corral register.
REGISTRY: Final = CollectorRegistry(auto_describe=True)
# process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds …: the names
# every Prometheus dashboard already knows, so no corral_ prefix. And python_info.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Latencies from a few milliseconds (a warm create, a store call) to a minute (a cold
# microvm, a template's first memory image).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STORE = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_JOB = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

SANDBOX_CREATES: Final = Counter(
    "corral_sandbox_creates_total",
    "Sandboxes created, by tier and how they started (cold, warm, restored, made).",
    ["tier", "how"],
    registry=REGISTRY,
)
SANDBOX_CREATE_FAILURES: Final = Counter(
    "corral_sandbox_create_failures_total",
    "Creates that did not give a sandbox, by reason (the error's class, or cancelled).",
    ["reason"],
    registry=REGISTRY,
)
SANDBOX_CREATE_DURATION: Final = Histogram(
    "corral_sandbox_create_duration_seconds",
    "Time a successful create took, from the call to the sandbox running.",
    ["tier", "how"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
EXEC_START: Final = Histogram(
    "corral_sandbox_exec_start_duration_seconds",
    "Time from an exec call to its command running in the sandbox (its pid known).",
    ["tier"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
EXEC_DURATION: Final = Histogram(
    "corral_sandbox_exec_duration_seconds",
    "Time from an exec call to its end: exited (the command ended), error (the call "
    "failed) or abandoned (its stream closed first).",
    ["tier", "outcome"],
    buckets=_LATENCY,
    registry=REGISTRY,
)
POOL_CLAIMS: Final = Counter(
    "corral_warm_pool_claims_total",
    "Claims of a warm sandbox: hit (one was ready) or miss (the pool was empty).",
    ["pool", "tier", "template", "result"],
    registry=REGISTRY,
)
JOB_ATTEMPTS: Final = Counter(
    "corral_job_attempts_total",
    "Job attempts this process ran to an end, by job kind and outcome.",
    ["kind", "outcome"],
    registry=REGISTRY,
)
JOB_DURATION: Final = Histogram(
    "corral_job_attempt_duration_seconds",
    "Time a job attempt ran, from its claim to its end, by job kind and outcome.",
    ["kind", "outcome"],
    buckets=_JOB,
    registry=REGISTRY,
)
CALLBACK_DELIVERIES: Final = Counter(
    "corral_callback_deliveries_total",
    "Callback POSTs, by outcome: delivered, retry (failed, sent again later), failed "
    "(for good), refused (the callback policy refused the URL).",
    ["outcome"],
    registry=REGISTRY,
)
STORE_TRANSACTION: Final = Histogram(
    "corral_store_transaction_duration_seconds",
    "Time a store transaction took, begin to commit or rollback, by kind (read, write).",
    ["kind"],
    buckets=_STORE,
    registry=REGISTRY,
)


class _Instruments(Collector):
    """The process's instruments, as one collector of another registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def registry_with(*collectors: Collector) -> CollectorRegistry:
    """A registry of the process's instruments and `collectors` (an app's own gauges,
    read at scrape time), leaving the process's registry as it is."""
    registry = CollectorRegistry()
    for collector in (_Instruments(), *collectors):
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The registry in Prometheus's text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class MetricsListener:
    """The registry served on a port of its own, without an API key, by a thread: what
    `corral worker` (which has no HTTP server) and a server whose API port is public
    expose to a Prometheus on a private network."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry = REGISTRY) -> None:
        self._server: WSGIServer
        self._thread: threading.Thread
        try:
            self._server, self._thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise InvalidRequest(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): pass "
                "another --metrics-port (CORRAL_METRICS_PORT), or 0 for no metrics listener"
            ) from None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
