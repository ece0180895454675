"""OpenTelemetry traces: the spans Corral's layers open, and their export when asked for.

Every layer opens its spans here (OpenTelemetry's API alone): the server one per request
(`corral.server.tracing`), the sandbox manager one per operation, the engine one per step
of a sandbox's start, the host side of the guest agent one per call, a job worker one per
run. Nested calls nest their spans, so one request is one trace. Until a tracer provider
is installed no span is made at all.

Nothing is recorded unless an entry point (`corral server`, `corral worker`) calls
`configure` with ``CORRAL_OTEL=on``: then the SDK (the `otel` extra) exports them over
OTLP/HTTP, configured by the standard ``OTEL_*`` variables, which the SDK reads itself
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_SDK_DISABLED`` ...). A process run under
another provider (``opentelemetry-instrument``) records into that one.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from corral.config import Settings
from corral.errors import InvalidRequest

P = ParamSpec("P")
R = TypeVar("R")

Attribute = str | int | float | bool
Attributes = Mapping[str, Attribute | None]

_tracer = trace.get_tracer("corral")

# The `parent` of a span that starts a trace of its own (a job's run, not its claimer's).
NEW_TRACE = context.Context()
# What a span stored for later is written as: W3C's, whatever OTEL_PROPAGATORS says for
# requests.
_W3C = TraceContextTextMapPropagator()

# Attributes of Corral's spans (beside OpenTelemetry's semantic conventions').
SANDBOX_ID = "corral.sandbox.id"


def _off() -> bool:
    """No tracer provider is installed: every span would be a no-op, so none is made (the
    API's no-op spans still cost microseconds each, on every exec and file call)."""
    return isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def span(
    name: str,
    attributes: Attributes | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: context.Context | None = None,
) -> AbstractContextManager[Span]:
    """A span named `name`, current while the block runs (a child of the current one, or of
    `parent`); None attributes are left out. An exception that leaves the block is recorded
    on it and marks it failed (OpenTelemetry's default)."""
    if _off():
        return nullcontext(trace.INVALID_SPAN)
    return _tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=_given(attributes)
    )


@contextmanager
def lasting(name: str, attributes: Attributes | None = None) -> Iterator[Span]:
    """A span for the whole life of an async generator (a command's stream), ended when the
    block ends, yet not current: a generator's yields would leave it current in its
    consumer's context. Make it current around the generator's own awaits with `within`."""
    if _off():
        yield trace.INVALID_SPAN
        return
    current = _tracer.start_span(name, attributes=_given(attributes))
    try:
        yield current
    except GeneratorExit:  # its consumer stopped reading: not a failure
        raise
    except BaseException as exc:
        current.record_exception(exc)
        fail(current, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        current.end()


def within(current: Span) -> AbstractContextManager[Span]:
    """`current` made the current span while the block runs (a `lasting` span's part)."""
    if not current.is_recording():
        return nullcontext(current)
    return trace.use_span(current, record_exception=False, set_status_on_exception=False)


def traced(
    name: str,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Coroutine[Any, Any, R]]]:
    """Runs an async function in a span named `name`."""

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
        @functools.wraps(function)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with span(name):
                return await function(*args, **kwargs)

        return run

    return decorate


def annotate(attributes: Attributes) -> None:
    """Add attributes to the current span (an id known only once the work has begun)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_given(attributes))


def _given(attributes: Attributes | None) -> dict[str, Attribute]:
    return {k: v for k, v in (attributes or {}).items() if v is not None}


# -- propagation ------------------------------------------------------------------------


def extract(headers: Iterable[tuple[bytes, bytes]]) -> context.Context:
    """The trace context a caller sent (``traceparent``, ``tracestate``), if any."""
    carrier = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name in (b"traceparent", b"tracestate", b"baggage")
    }
    return propagate.extract(carrier) if carrier else context.Context()


def traceparent() -> str | None:
    """The current span's W3C `traceparent`, to store with work that runs later (a job);
    None with traces off."""
    if _off():
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def resumed(traceparent: str | None) -> context.Context:
    """The `parent` of a span under the one `traceparent` names (stored by `traceparent()`
    when the work was asked for); without one, a trace of its own.

    A child, not a span of a new trace with an OTel link to it (the messaging conventions'
    way for consumers of batches): a job is one message, a child is what Jaeger and Tempo
    show inside the submitter's trace (a link is a reference to follow by hand), and the
    submit's sampling decision carries over to its runs."""
    return _W3C.extract({"traceparent": traceparent}) if traceparent else NEW_TRACE


def fail(current: Span, message: str) -> None:
    current.set_status(Status(StatusCode.ERROR, message))


# -- export -----------------------------------------------------------------------------


def configure(settings: Settings, service: str) -> None:
    """At an entry point: with ``CORRAL_OTEL=on``, install the SDK's tracer provider,
    exporting in batches over OTLP/HTTP as the ``OTEL_*`` variables say; `service` is the
    service name unless ``OTEL_SERVICE_NAME`` gives one."""
    if not settings.otel:
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise InvalidRequest(
            f"CORRAL_OTEL=on needs the OpenTelemetry SDK ({exc.name} is missing): install "
            "Corral with its `otel` extra (`uv sync --extra otel`, `pip install corral[otel]`) "
            "or set CORRAL_OTEL=off"
        ) from None
    # The standard variables win over Corral's name for the service.
    resource = Resource.create({"service.name": service}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
