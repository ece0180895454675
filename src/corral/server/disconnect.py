"""Telling a handler that its client went away, while it waits for something else.

connectrpc notices a disconnect only when a streaming handler yields its next
message; a command that prints nothing for an hour would keep running for a client long
gone. The app wraps each request's `receive` so the `http.disconnect` message also sets
an event the handler can watch (`current()`), in the request's own context.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

_disconnected: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar(
    "corral_disconnected", default=None
)


def watch(receive: Receive) -> Receive:
    """`receive`, also setting this request's disconnect event (see `current`)."""
    event = asyncio.Event()
    _disconnected.set(event)

    async def receive_and_watch() -> Message:
        message = await receive()
        if message["type"] == "http.disconnect":
            event.set()
        return message

    return receive_and_watch


def current() -> asyncio.Event | None:
    """The event set when the client of the request being handled disconnects."""
    return _disconnected.get()
