"""OpenTelemetry traces: a server with CORRAL_OTEL=on exports one trace per request, its
server span the parent of the manager's, engine's and guest agent's spans, continuing a
caller's `traceparent`; a job's runs are children of its Submit's span (through the
traceparent stored with the job); without it nothing is recorded, nor stored.

The servers export over OTLP/HTTP (the standard OTEL_* variables) to a receiver the test
runs on loopback (`tests.kit.otlp`), as they would to a collector.

Spans are checked from the server's exports, not from this process: the tests never
install a global tracer provider here, which would trace every other test's in-process
engine and manager.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry import trace

from corral import tracing
from corral.config import Settings
from corral.jobs.queue import JobQueue
from corral.jobs.spec import JobSpec
from corral.store import Store
from tests.conftest import LiveServer, new_job_row, opts, require_backend, start_server
from tests.kit.connect import call, stream
from tests.kit.otlp import OtlpReceiver, Span
from tests.kit.polling import wait_until

SERVER_KIND = 2  # opentelemetry.proto Span.SpanKind.SPAN_KIND_SERVER


def _env(receiver: OtlpReceiver, **more: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: export at once, not every 5 s
        **more,
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def traced(settings: Settings, receiver: OtlpReceiver) -> Iterator[LiveServer]:
    """A server with traces on and no warm pool: every create starts a sandbox cold, so
    its engine's spans are the request's."""
    require_backend(settings, "namespace")
    data = settings.runtime_dir / f"traces-{secrets.token_hex(4)}"
    live = start_server(settings, data, pool_size=0, extra_env=_env(receiver, CORRAL_OTEL="on"))
    try:
        yield live
    finally:
        live.stop()


def _trace(receiver: OtlpReceiver, trace_id: str, *names: str) -> dict[str, Span]:
    """The spans of trace `trace_id` by name, once every one of `names` has arrived."""

    def arrived() -> dict[str, Span] | None:
        spans = {s.name: s for s in receiver.spans() if s.trace_id == trace_id}
        return spans if set(names) <= set(spans) else None

    return wait_until(arrived, f"the spans {names} of trace {trace_id}")


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_a_create_and_exec_are_one_trace_through_manager_engine_and_agent(
    traced: LiveServer, receiver: OtlpReceiver
) -> None:
    header, trace_id, caller_span = _traceparent()
    headers = {"traceparent": header}
    created = call(traced, "Create", {"template": "host", "timeoutSeconds": 60}, headers=headers)
    assert created.status_code == 200, created.text
    sandbox_id = created.json()["sandbox"]["id"]
    try:
        _, end = stream(
            traced, "Exec", {"sandboxId": sandbox_id, "cmd": "echo hi"}, headers=headers
        )
        assert end.get("error") is None, end
    finally:
        call(traced, "Kill", {"sandboxId": sandbox_id})

    spans = _trace(
        receiver,
        trace_id,
        *("corral.v1.SandboxService/Create", "sandbox.create", "engine.create"),
        *("engine.admit", "engine.cgroup", "engine.start", "engine.plan", "engine.launch"),
        *("agent.ping", "corral.v1.SandboxService/Exec", "sandbox.exec", "agent.exec"),
    )

    def parent(name: str) -> str:
        by_id = {s.span_id: s.name for s in spans.values()}
        return by_id.get(spans[name].parent_id, spans[name].parent_id)

    # The caller's span is the parent of both requests' server spans: its trace goes on.
    for rpc in ("Create", "Exec"):
        server = spans[f"corral.v1.SandboxService/{rpc}"]
        assert server.parent_id == caller_span and server.kind == SERVER_KIND
        assert server.service == "corral-server"
        assert server.attributes["rpc.method"] == rpc
        assert server.attributes["http.response.status_code"] == 200
    assert parent("sandbox.create") == "corral.v1.SandboxService/Create"
    assert parent("engine.create") == "sandbox.create"
    for step in ("engine.admit", "engine.cgroup", "engine.start"):
        assert parent(step) == "engine.create"
    for step in ("engine.plan", "engine.launch", "agent.ping"):
        assert parent(step) == "engine.start"
    assert parent("sandbox.exec") == "corral.v1.SandboxService/Exec"
    assert parent("agent.exec") == "sandbox.exec"
    for name in ("sandbox.create", "engine.create", "sandbox.exec"):
        assert spans[name].attributes["corral.sandbox.id"] == sandbox_id
    assert spans["sandbox.create"].attributes["corral.sandbox.start"] == "cold"
    assert spans["sandbox.exec"].attributes["corral.exec.exit_code"] == 0


def test_the_sdk_continues_the_applications_current_span(
    traced: LiveServer, receiver: OtlpReceiver
) -> None:
    """An application that traces (its own tracer provider, here not even the global one)
    and calls the SDK under a span: the server's spans are that span's children."""
    from opentelemetry.sdk.trace import TracerProvider

    from corral import Sandbox

    tracer = TracerProvider().get_tracer("the application")
    with (
        tracer.start_as_current_span("work") as work,
        Sandbox.create(template="host", timeout=60, **opts(traced)) as sbx,
    ):
        assert sbx.commands.run("true").exit_code == 0
        assert sbx.sandbox_id in [info.sandbox_id for info in Sandbox.list(**opts(traced))]
    context = work.get_span_context()
    trace_id, span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    spans = _trace(
        receiver,
        trace_id,
        "corral.v1.SandboxService/Create",
        "corral.v1.SandboxService/Exec",
        "corral.v1.SandboxService/Kill",
        "corral.v1.SandboxService/List",  # a plain HTTP call, not the RPC client's
    )
    for name in ("Create", "Exec", "Kill", "List"):
        assert spans[f"corral.v1.SandboxService/{name}"].parent_id == span_id


def test_a_request_without_traceparent_starts_a_trace_and_a_failure_is_recorded(
    traced: LiveServer, receiver: OtlpReceiver
) -> None:
    # The caller's error (no such sandbox): the code on the span, not a server failure.
    refused = call(traced, "Get", {"sandboxId": "sbx_" + "0" * 16})
    assert refused.status_code == 404, refused.text

    def server_span() -> Span | None:
        spans = [
            s
            for s in receiver.spans()
            if s.name == "corral.v1.SandboxService/Get" and s.parent_id == ""
        ]
        return spans[0] if spans else None

    span = wait_until(server_span, "the server span of Get")
    assert span.attributes["rpc.connect_rpc.error_code"] == "not_found"
    assert span.attributes["http.response.status_code"] == 404
    assert span.status != 2  # the caller's fault: not an error of the server


def test_e2b_rest_spans_are_named_by_route(traced: LiveServer, receiver: OtlpReceiver) -> None:
    header, trace_id, _ = _traceparent()
    listed = httpx.get(
        traced.url + "/sandboxes",
        headers={"X-API-KEY": traced.key, "traceparent": header},
        timeout=30,
    )
    assert listed.status_code == 200, listed.text
    span = _trace(receiver, trace_id, "GET /sandboxes")["GET /sandboxes"]
    assert span.kind == SERVER_KIND and span.attributes["http.route"] == "/sandboxes"


def test_without_corral_otel_nothing_is_recorded() -> None:
    """Traces are opt-in: the standard endpoint variable alone turns nothing on, and no
    span is made (not even the API's no-op one)."""
    from opentelemetry import trace

    from corral import tracing

    settings = Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert not settings.otel
    tracing.configure(settings, "corral-server")
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    with tracing.span("sandbox.create") as span:
        assert span is trace.INVALID_SPAN and not span.is_recording()


def test_a_job_run_is_a_child_of_its_submits_span(
    traced: LiveServer, receiver: OtlpReceiver
) -> None:
    header, trace_id, caller_span = _traceparent()
    submitted = httpx.post(
        traced.url + "/corral.v1.JobService/Submit",
        json={"spec": {"command": ["true"]}},
        headers={"Authorization": f"Bearer {traced.key}", "traceparent": header},
        timeout=30,
    )
    assert submitted.status_code == 200, submitted.text
    job_id = submitted.json()["job"]["id"]
    # The run, and what it did, are in the caller's trace: under the Submit's server span.
    spans = _trace(receiver, trace_id, "corral.v1.JobService/Submit", "job.run", "agent.exec")
    submit, job = spans["corral.v1.JobService/Submit"], spans["job.run"]
    assert submit.parent_id == caller_span
    assert submit.attributes["corral.job.id"] == job_id
    assert job.parent_id == submit.span_id
    assert job.attributes["corral.job.id"] == job_id
    assert job.attributes["corral.job.attempt"] == 1
    assert job.attributes["corral.job.outcome"] == "succeeded"
    by_id = {s.span_id: s for s in receiver.spans() if s.trace_id == trace_id}
    ancestor = spans["agent.exec"]
    while ancestor.parent_id in by_id and ancestor.name != "job.run":
        ancestor = by_id[ancestor.parent_id]
    assert ancestor == job  # the run's own spans nest under it


def test_a_stored_traceparent_resumes_its_span() -> None:
    header, trace_id, span_id = _traceparent()
    parent = trace.get_current_span(tracing.resumed(header)).get_span_context()
    assert (f"{parent.trace_id:032x}", f"{parent.span_id:016x}") == (trace_id, span_id)
    assert parent.is_remote and parent.trace_flags.sampled
    # A job stored without one (traces off when submitted, or before revision 0017).
    assert tracing.resumed(None) is tracing.NEW_TRACE
    assert not trace.get_current_span(tracing.resumed(None)).get_span_context().is_valid


async def test_with_traces_off_a_submit_stores_no_traceparent(store: Store) -> None:
    assert tracing.traceparent() is None  # no tracer provider in the tests' process
    team = store.create_team("untraced")
    record, _, _ = await JobQueue(store, store.settings).submit(
        team, JobSpec.from_dict({"command": ["true"]})
    )
    stored = store.job(record.id)
    assert stored is not None and stored.traceparent is None


def test_a_jobs_traceparent_is_stored_as_given(store: Store) -> None:
    header, _, _ = _traceparent()
    row, _ = store.insert_job(new_job_row(store.create_team("traced"), traceparent=header))
    stored = store.job(row.id)
    assert stored is not None and stored.traceparent == header
