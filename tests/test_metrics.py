"""Prometheus metrics: a live server's `GET /metrics` scraped with prometheus-client's
own text parser after a create, an exec, a refused create and a job with a callback;
who may scrape (CORRAL_METRICS); `corral worker --metrics-port`; and the instruments
that are cheaper to check in-process (store transactions, warm pool misses)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from corral import instruments
from corral.config import Settings
from corral.errors import InvalidRequest, UnknownBackend, UnknownTemplate
from corral.isolation import Engine
from corral.jobs.callback_policy import CallbackPolicy
from corral.jobs.callbacks import CallbackDispatcher
from corral.sandboxes.observe import failure_reason, how_created
from corral.sandboxes.pool import WarmPool
from corral.server.app import CorralApp
from corral.server.base import Services
from corral.server.metrics import MetricsEndpoint
from corral.store import Store
from tests.conftest import (
    LiveServer,
    free_port,
    isolation_of,
    server_template,
    start_worker,
)
from tests.kit.connect import call, error, stream
from tests.kit.http import CallbackReceiver
from tests.kit.polling import until, wait_until
from tests.test_callbacks import run_job

# Queue depths, job outcomes and store gauges come from the store: on SQLite and on
# PostgreSQL.
pytestmark = pytest.mark.every_database

Samples = list[Sample]
CALLBACKS = "corral_callback_deliveries_total"


def parse(text: str) -> Samples:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(url: str, key: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.get(url, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=")
    return parse(reply.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0: none)."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [s.labels for s in samples if s.name == name]


def _job(server: LiveServer, method: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(
        f"{server.url}/corral.v1.JobService/{method}",
        json=body,
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


# -- a live server ---------------------------------------------------------------------------


@pytest.mark.usefixtures("sandbox_host")
def test_a_scrape_shows_what_the_server_did(
    server: LiveServer, request: pytest.FixtureRequest, receiver: CallbackReceiver
) -> None:
    metrics = server.url + "/metrics"
    before = scrape(metrics, server.key)
    isolation = isolation_of(request)
    asked = {"timeoutSeconds": 120, "isolation": isolation, "template": server_template(isolation)}
    created = call(server, "Create", asked)
    assert created.status_code == 200, created.text
    sandbox = created.json()["sandbox"]
    tier = sandbox["isolation"]
    try:
        _, end = stream(server, "Exec", {"sandboxId": sandbox["id"], "cmd": "true"})
        assert "error" not in end, end
        refused = call(server, "Create", {"isolation": "no-such-tier"})
        assert "no-such-tier" in error(refused, 400, "invalid_argument")
        job = _job(server, "Submit", {"spec": {"command": ["true"], "callbackUrl": receiver.url}})
        job_id = job["job"]["id"]
        during = scrape(metrics, server.key)
        # Sandboxes by state and tier come from the store: this one is running.
        assert value(during, "corral_sandboxes", state="running", tier=tier) >= 1
        assert {"state": "queued"} in series(during, "corral_jobs")
        assert {"state": "running"} in series(during, "corral_jobs")
    finally:
        call(server, "Kill", {"sandboxId": sandbox["id"]})

    def job_done() -> bool:
        state: str = _job(server, "Get", {"jobId": job_id})["job"]["state"]
        return state == "JOB_STATE_SUCCEEDED"

    wait_until(job_done, "the job to succeed")

    def delivered() -> Samples | None:
        # Delivered now against delivered before: the other outcomes (an earlier test's
        # retries and failures on this shared server) are no baseline for this one.
        now = scrape(metrics, server.key)
        moved = value(now, CALLBACKS, outcome="delivered") - value(
            before, CALLBACKS, outcome="delivered"
        )
        return now if moved > 0 else None

    after = wait_until(delivered, "the job's callbacks to be counted")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    how = how_created(sandbox["stateReason"])
    assert how in ("cold", "warm", "restored", "made"), sandbox["stateReason"]
    assert moved("corral_sandbox_creates_total", tier=tier, how=how) >= 1
    assert moved("corral_sandbox_create_duration_seconds_count", tier=tier, how=how) >= 1
    assert moved("corral_sandbox_create_failures_total", reason=UnknownBackend.__name__) >= 1
    assert moved("corral_sandbox_exec_start_duration_seconds_count", tier=tier) >= 1
    assert moved("corral_sandbox_exec_duration_seconds_count", tier=tier, outcome="exited") >= 1
    assert moved("corral_job_attempts_total", kind="command", outcome="succeeded") >= 1
    assert moved("corral_job_attempt_duration_seconds_count", outcome="succeeded") >= 1
    assert moved("corral_store_transaction_duration_seconds_count", kind="write") >= 1
    assert moved("corral_store_transaction_duration_seconds_count", kind="read") >= 1
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_cpu_seconds_total") > 0
    # The server's warm pools: their sizes, and the claim that took this sandbox.
    if how == "warm":
        pool = {"pool": "sandboxes", "tier": tier}
        assert [p for p in series(after, "corral_warm_pool_size") if pool.items() <= p.items()]
        assert moved("corral_warm_pool_claims_total", **pool, result="hit") >= 1
    # No label carries an id: every label value is one of a few words.
    ids = {sandbox["id"], job_id}
    assert not [s for s in after if ids & set(s.labels.values())]


def test_metrics_on_the_api_port_take_the_default_teams_key(server: LiveServer) -> None:
    metrics = server.url + "/metrics"
    message = error(httpx.get(metrics, timeout=30), 401, "unauthenticated")
    assert "default.key" in message and "CORRAL_METRICS=on" in message
    bad = httpx.get(metrics, headers={"Authorization": "Bearer nope"}, timeout=30)
    error(bad, 401, "unauthenticated")
    # The team is made in the server's store directly: faster than `corral admin` twice.
    store = server.store()
    try:
        store.create_team("metrics-tenant")
        tenant = store.create_api_key("metrics-tenant")
    finally:
        store.close()
    # A tenant's key is refused: the series count every team's activity.
    forbidden = httpx.get(metrics, headers={"Authorization": f"Bearer {tenant}"}, timeout=30)
    assert "default" in error(forbidden, 403, "permission_denied")
    posted = httpx.post(metrics, headers={"Authorization": f"Bearer {server.key}"}, timeout=30)
    error(posted, 405, "invalid_argument")


@pytest.mark.usefixtures("sandbox_host")
def test_a_worker_serves_its_metrics_on_its_metrics_port(server: LiveServer) -> None:
    port = free_port()
    worker = start_worker(server, CORRAL_METRICS_PORT=str(port), CORRAL_JOB_WORKERS="1")
    try:
        url = f"http://127.0.0.1:{port}/metrics"  # no key: a port of its own

        def pooled() -> Samples | None:
            samples = scrape(url)
            return samples if series(samples, "corral_warm_pool_size") else None

        samples = wait_until(pooled, "the worker's warm pool to start")
        assert value(samples, "process_resident_memory_bytes") > 0
        assert [p["pool"] for p in series(samples, "corral_warm_pool_size")] == ["jobs"]
        # Its store calls (claims, heartbeats) are its own, not the server's.
        assert value(samples, "corral_store_transaction_duration_seconds_count") > 0
    finally:
        assert worker.stop() == 0


# -- in-process -------------------------------------------------------------------------------


class _Asgi:
    """One request through an ASGI app: the status and the body it answered."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        else:
            self.body += message.get("body", b"")

    async def get(self, app: CorralApp, path: str) -> _Asgi:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "GET", "path": path, "headers": []}
        await app(scope, receive, self.send)
        return self


@pytest.mark.parametrize(("mode", "status"), [("on", 200), ("off", 404)])
def test_corral_metrics_on_needs_no_key_and_off_serves_nothing(
    store_settings: Settings, mode: str, status: int
) -> None:
    app = CorralApp(store_settings.with_(metrics=mode))
    answer = asyncio.run(_Asgi().get(app, "/metrics"))
    assert answer.status == status, answer.body
    if mode == "on":
        assert value(parse(answer.body.decode()), "process_resident_memory_bytes") > 0
    else:
        assert "CORRAL_METRICS=off" in json.loads(answer.body)["message"]


def test_a_metrics_port_in_use_is_refused_with_what_to_do() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidRequest, match=f"127.0.0.1:{port}.*another --metrics-port"):
            instruments.MetricsListener("127.0.0.1", port)


def test_the_listener_serves_the_registry_without_a_key() -> None:
    listener = instruments.MetricsListener("127.0.0.1", 0)
    try:
        samples = scrape(f"http://127.0.0.1:{listener.port}/metrics")
        assert value(samples, "process_resident_memory_bytes") > 0
    finally:
        listener.close()


def test_a_servers_metrics_port_serves_its_store_gauges_without_a_key(
    store_settings: Settings, store: Store
) -> None:
    services = Services()
    services.store = store
    endpoint = MetricsEndpoint(store_settings.with_(metrics_port=free_port()), services)
    endpoint.start()
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        samples = scrape(url)
        assert value(samples, "corral_jobs", state="queued") == 0
        assert {"state": "running"} in series(samples, "corral_jobs")
        assert value(samples, "process_resident_memory_bytes") > 0
    finally:
        endpoint.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


def test_store_transactions_are_timed_as_reads_and_writes(store: Store) -> None:
    def count(kind: str) -> float:
        got = instruments.REGISTRY.get_sample_value(
            "corral_store_transaction_duration_seconds_count", {"kind": kind}
        )
        return got or 0.0

    reads, writes = count("read"), count("write")
    store.create_team("timed")  # a write
    assert store.queue_counts() == {"queued": 0, "running": 0}  # a read
    assert count("write") >= writes + 1
    assert count("read") >= reads + 1


async def test_callback_deliveries_are_counted_by_outcome(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    def count(outcome: str) -> float:
        labels = {"outcome": outcome}
        return instruments.REGISTRY.get_sample_value(CALLBACKS, labels) or 0.0

    before = {outcome: count(outcome) for outcome in ("delivered", "retry", "refused")}
    receiver.fail_first = 1  # each critical event (step_end, done) fails once
    ok = run_job(store, receiver.url)
    allowing = dispatchers()
    allowing.start()
    await until(lambda: store.callback_counts([ok])[ok].delivered == 6, "the deliveries")
    await allowing.aclose()
    assert count("delivered") == before["delivered"] + 6
    assert count("retry") == before["retry"] + 2
    # The default policy refuses a loopback receiver.
    run_job(store, receiver.url)
    dispatchers(CallbackPolicy.parse("")).start()
    await until(lambda: count("refused") > before["refused"], "a refusal to be counted")


def test_a_claim_of_an_empty_pool_is_a_miss(store_settings: Settings) -> None:
    pool = WarmPool(Engine(store_settings), 0, "host", "namespace", role="jobs")
    labels = {"pool": "jobs", "tier": "namespace", "template": "host", "result": "miss"}
    before = instruments.REGISTRY.get_sample_value("corral_warm_pool_claims_total", labels) or 0
    assert pool.claim() is None
    assert instruments.REGISTRY.get_sample_value("corral_warm_pool_claims_total", labels) == (
        before + 1
    )


def test_failure_reasons_are_error_classes_never_messages() -> None:
    assert failure_reason(UnknownTemplate("no template 'x' for team 1234")) == "UnknownTemplate"
    assert failure_reason(asyncio.CancelledError()) == "cancelled"
    assert failure_reason(RuntimeError("boom")) == "internal"
    assert how_created("created from the warm pool") == "warm"
    assert how_created("created") == "cold"
