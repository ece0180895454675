"""Ending a streamed envd response as a transport failure, not as an RPC error.

E2B's SDK tells "the sandbox died under this stream" from an error envd answered by how
the stream ends: a connection reset mid-body makes it probe `/health` (502: "the sandbox
was killed or reached its end of life"), while a clean end envelope with an error code is
taken at its word, and so is a connection closed politely mid-body (its HTTP client calls
that a protocol error, not a transport failure). connect-python always ends a stream
with an envelope, so a handler that sees its sandbox die calls `break_stream()` and
`breakable` keeps that last envelope from being sent: the ASGI server then closes the
connection with the body unfinished (uvicorn logs one line, "ASGI callable returned
without completing response"), and, under uvicorn, as a reset (`_reset_on_close`).
"""

from __future__ import annotations

import contextvars
import socket
import struct
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
        if request.broken:
            _reset_on_close(send)

    return serve


def _reset_on_close(send: Send) -> None:
    """Make the connection's close a reset (RST), where the ASGI server lets us.

    ASGI gives no access to the connection; uvicorn's `send` is a method of its request
    cycle, which holds the asyncio transport. Linger 0 turns the close uvicorn does for
    an unfinished response into a reset. Elsewhere the close stays a FIN.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    get_extra_info = getattr(transport, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info is not None else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
