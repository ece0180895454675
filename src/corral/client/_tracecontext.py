"""The caller's trace context for the SDK's plain HTTP calls (`_unary`): W3C
``traceparent`` (and ``tracestate``) when the application traces with OpenTelemetry and has
a current span, so the server's spans continue its trace. (The RPC client's transport,
pyqwest, sends it on its own calls.)

Only an application that has loaded OpenTelemetry can have a current span: the SDK never
loads it itself, so the CLI and applications that do not trace pay nothing for this.
"""

from __future__ import annotations

import sys


def trace_headers() -> dict[str, str]:
    """The current span's context as headers; empty without one."""
    if "opentelemetry.trace" not in sys.modules:
        return {}
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers
