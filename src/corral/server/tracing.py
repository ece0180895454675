"""The server span of each API request (Connect, gRPC-Web, E2B's REST API and envd).

`CorralApp` runs every request but a sandbox port's traffic in `request_span`: a SERVER
span that continues the caller's W3C trace context (``traceparent``), so the manager's,
engine's and guest agent's spans opened while it is answered are its children. Its name
is the RPC (``corral.v1.SandboxService/Create``, ``process.Process/Start``) or the HTTP
method, which E2B's router refines to the route (``POST /sandboxes``, `name_route`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from corral import tracing

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# `/<package.Service>/<Method>`: Connect's and gRPC's path of an RPC.
_RPC_PATH = re.compile(r"/([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)/([A-Za-z_]\w*)")


@contextmanager
def request_span(scope: Scope, send: Send) -> Iterator[Send]:
    """The request's server span, current while the block runs; the `send` to answer
    through, which records the response's HTTP status on it (a 5xx fails it)."""
    path: str = scope["path"]
    method: str = scope.get("method", "")
    rpc = _RPC_PATH.fullmatch(path)
    attributes: dict[str, tracing.Attribute | None] = {
        "http.request.method": method,
        "url.path": path,
    }
    if rpc is not None:
        name = f"{rpc[1]}/{rpc[2]}"
        attributes.update({"rpc.service": rpc[1], "rpc.method": rpc[2]})
    else:
        name = method
    parent = tracing.extract(scope.get("headers", ()))
    with tracing.span(name, attributes, kind=SpanKind.SERVER, parent=parent) as current:
        # wraps: the E2B adapter unwraps `send` to reach uvicorn's connection and reset it
        # (corral.server.e2b.broken); without it a killed sandbox's stream ended cleanly.
        @functools.wraps(send)
        async def recorded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                current.set_attribute("http.response.status_code", status)
                if status >= 500:
                    tracing.fail(current, f"HTTP {status}")
            await send(message)

        yield recorded


def name_route(method: str, pattern: str) -> None:
    """Name the current request's span by its route (`pattern`'s `{params}` kept), once
    a router found it."""
    current = trace.get_current_span()
    current.update_name(f"{method} {pattern}")
    current.set_attribute("http.route", pattern)


def rpc_failed(code: str, message: str, *, callers_fault: bool) -> None:
    """Record an RPC's error code on the current request's span; a failure of the server's
    (not the caller's: a bad argument, a missing sandbox ...) fails the span."""
    current = trace.get_current_span()
    current.set_attribute("rpc.connect_rpc.error_code", code)
    if not callers_fault:
        tracing.fail(current, f"{code}: {message}")
