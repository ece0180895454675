"""A loopback OTLP/HTTP receiver: what a server's trace exporter sends, as spans to check.

It stands in for an OpenTelemetry collector: a real `ThreadingHTTPServer` on 127.0.0.1
that decodes each export (OTLP protobuf, `ExportTraceServiceRequest`) with the
OpenTelemetry proto package the exporter itself uses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.kit.http import LoopbackHTTP, QuietHandler


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str  # hex, as in a traceparent header
    span_id: str
    parent_id: str  # "" for a root span
    kind: int  # opentelemetry.proto's Span.SpanKind: 2 is SERVER
    service: str  # the resource's service.name
    attributes: dict[str, Any] = field(default_factory=dict)
    status: int = 0  # 2 is ERROR
    links: tuple[str, ...] = ()  # the span ids linked to


class OtlpReceiver(LoopbackHTTP):
    """Records every span exported to it; `endpoint` is for OTEL_EXPORTER_OTLP_ENDPOINT."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                export = ExportTraceServiceRequest.FromString(self.read_body())
                receiver._add(_spans_of(export))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        super().__init__(Handler)
        self.endpoint = self.url.removesuffix("/hook")

    def _add(self, spans: Iterable[Span]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)


def _spans_of(export: ExportTraceServiceRequest) -> list[Span]:
    spans = []
    for resource_spans in export.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    Span(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        service=str(resource.get("service.name", "")),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        status=span.status.code,
                        links=tuple(link.span_id.hex() for link in span.links),
                    )
                )
    return spans
