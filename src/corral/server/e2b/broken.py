"""Ending a streamed envd response as a transport failure, not as an RPC error.

E2B's SDK tells "the sandbox died under this stream" from an error envd answered by how
the stream ends: a connection reset mid-body makes it probe `/health` (502: "the sandbox
was killed or reached its end of life"), while a clean end envelope with an error code is
taken at its word, and so is a connection closed politely mid-body (its HTTP client calls
that a protocol error, not a transport failure). connectrpc always ends a stream
with an envelope, so a handler that sees its sandbox die calls `break_stream()` and
`breakable` keeps that last envelope from being sent and, under uvicorn, closes the
connection itself, as a reset (`_reset`), before the app returns: uvicorn then sees a
connection that went away rather than an app that returned without completing its
response (which it would log as an ERROR, once for every sandbox killed under a stream).
Elsewhere the ASGI server closes the unfinished response its own way.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
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
            await _reset(send)

    return serve


# How long `_reset` waits for uvicorn to see the connection closed (it hears of it once
# what the connection still had to send is written: at once, unless the client is slow).
_CLOSE_WAIT = 1.0


async def _reset(send: Send) -> None:
    """Close the connection with a reset (RST), where the ASGI server lets us, and wait
    until the server has seen it close.

    ASGI gives no access to the connection; uvicorn's `send` (under any wrappers made
    with `functools.wraps`) is a method of its request cycle, which holds the asyncio
    transport and sets `disconnected` when the transport reports the connection lost.
    Linger 0 turns the close into a reset.
    """
    cycle: Any = getattr(inspect.unwrap(send), "__self__", None)  # through wrappers
    transport = getattr(cycle, "transport", None)
    if transport is None or not hasattr(cycle, "disconnected"):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.close()
    deadline = asyncio.get_running_loop().time() + _CLOSE_WAIT
    while not cycle.disconnected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)
