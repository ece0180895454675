"""Ending a streamed envd response as a transport failure, not as an RPC error.

E2B's SDK tells "the sandbox died under this stream" from an error envd answered by how
the stream ends: a connection that drops mid-body makes it probe `/health` (502: "the
sandbox was killed or reached its end of life"), while a clean end envelope with an
error code is taken at its word. connect-python always ends a stream with an envelope,
so a handler that sees its sandbox die calls `break_stream()` and `breakable` keeps that
last envelope from being sent: the ASGI server then closes the connection with the body
unfinished (uvicorn logs one line, "ASGI callable returned without completing response").
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

from corral.server.disconnect import Receive

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Request:
    broken = False


_request: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "corral_e2b_broken", default=None
)


def break_stream() -> None:
    """Make the response of the request being handled end without its last envelope."""
    request = _request.get()
    if request is not None:
        request.broken = True


def breakable(app: ASGIApp) -> ASGIApp:
    """`app`, whose handlers can `break_stream()` their response."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        request = _Request()
        _request.set(request)

        async def send_unless_broken(message: dict[str, Any]) -> None:
            ending = message["type"] == "http.response.trailers" or (
                message["type"] == "http.response.body" and not message.get("more_body")
            )
            if not (request.broken and ending):
                await send(message)

        await app(scope, receive, send_unless_broken)

    return serve
