"""The port proxy's HTTP side: a request for a sandbox's port relayed there, and the
response back, bodies streamed both ways.

h11 speaks HTTP/1.1 to the sandbox's server over connections the host opens inside the
sandbox (`Sandbox.open_port`). A connection is kept for the next request to the same
sandbox and port (a new connection costs the sandbox's server an accept, often a thread):
that halves the proxy's cost of a small GET (`benchmarks/ports.py`). The token is checked
on every request all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h11

from corral import errors
from corral.errors import CorralError, ServerUnavailable
from corral.server.disconnect import Receive
from corral.server.ports import HOP_BY_HOP, PortRoute, Scope, error_body, forwarded_headers, route

if TYPE_CHECKING:
    from corral.isolation import Sandbox
    from corral.server.base import Services

Send = Callable[[dict[str, Any]], Awaitable[None]]

_READ_SIZE = 64 * 1024
_KEEP_IDLE = 4.0  # seconds a connection into a sandbox is kept for the next request
_KEEP_PER_PORT = 8


class PortProxy:
    """Serves HTTP requests for sandboxes' ports; opens connections into them for
    WebSocket upgrades too (`corral.server.port_websocket`)."""

    def __init__(self, services: Services, domain: str) -> None:
        self._services = services
        self.domain = domain
        self._idle = _IdleConnections()

    def _sandbox(self, route: PortRoute) -> Sandbox:
        manager = self._services.manager
        if manager is None:
            raise ServerUnavailable("the Corral server is starting or stopping; try again")
        return manager.exposed(route.sandbox_id, route.token)

    async def open(self, route: PortRoute) -> socket.socket:
        """A new connection to the route's port, once its token has been checked."""
        return await self._sandbox(route).open_port(route.port)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Relay an HTTP request for a sandbox's port and its response; False (and
        nothing done) when the request is not for a sandbox's port."""
        try:
            port_route = route(scope, self.domain)
            if port_route is None:
                return False
            sandbox = self._sandbox(port_route)  # the token is checked on every request
            key = (port_route.sandbox_id, port_route.port)
            # Only a request without a body goes on a kept connection: if the sandbox's
            # server has closed it meanwhile, the request (nothing of it consumed) is
            # sent again on a new one.
            upstream = None if _has_body(scope) else self._idle.take(key)
            if upstream is not None:
                try:
                    await self._exchange(key, port_route, scope, receive, send, upstream, True)
                    return True
                except _Stale:
                    pass
            upstream = await _Upstream.open(sandbox, port_route.port)
        except CorralError as exc:
            await _send_error(send, exc)
            return True
        await self._exchange(key, port_route, scope, receive, send, upstream, False)
        return True

    async def _exchange(
        self,
        key: tuple[str, int],
        port_route: PortRoute,
        scope: Scope,
        receive: Receive,
        send: Send,
        upstream: _Upstream,
        reused: bool,
    ) -> None:
        try:
            await _relay(port_route, scope, receive, send, upstream, reused)
        except BaseException:
            upstream.close()
            raise
        if upstream.reusable():
            self._idle.give(key, upstream)
        else:
            upstream.close()

    def close(self) -> None:
        self._idle.close()


class _Stale(Exception):
    """A kept connection failed before any answer: the sandbox's server had closed it."""


def _has_body(scope: Scope) -> bool:
    return any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])


@dataclass(eq=False)
class _Upstream:
    """One HTTP/1.1 connection into a sandbox's port."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection
    idle_since: float = 0.0
    answering: bool = False  # the response to the current request has begun

    @classmethod
    async def open(cls, sandbox: Sandbox, port: int) -> _Upstream:
        sock = await sandbox.open_port(port)
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=_READ_SIZE)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer, h11.Connection(h11.CLIENT))

    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def fresh(self, now: float) -> bool:
        return (
            now - self.idle_since < _KEEP_IDLE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        self.writer.transport.abort()


class _IdleConnections:
    """Kept-alive connections into sandboxes' ports, each reused only for the same
    sandbox and port (after that request's own token check), and dropped after
    `_KEEP_IDLE` seconds: less than the 5 s idle timeout of common servers (Node,
    uvicorn), so a kept connection is seldom one its server is closing."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Upstream]] = {}
        self._swept = 0.0

    def take(self, key: tuple[str, int]) -> _Upstream | None:
        now = time.monotonic()
        self._sweep(now)
        idle = self._idle.get(key)
        while idle:
            upstream = idle.pop()
            if upstream.fresh(now):
                return upstream
            upstream.close()
        return None

    def give(self, key: tuple[str, int], upstream: _Upstream) -> None:
        upstream.conn.start_next_cycle()
        upstream.idle_since = time.monotonic()
        idle = self._idle.setdefault(key, [])
        if len(idle) < _KEEP_PER_PORT:
            idle.append(upstream)
        else:
            upstream.close()

    def _sweep(self, now: float) -> None:
        """Close what has been idle too long (a killed sandbox's connections too)."""
        if now - self._swept < _KEEP_IDLE:
            return
        self._swept = now
        for key, idle in list(self._idle.items()):
            for upstream in idle:
                if not upstream.fresh(now):
                    upstream.close()
            self._idle[key] = [u for u in idle if not u.writer.is_closing()]
            if not self._idle[key]:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for upstream in idle:
                upstream.close()
        self._idle.clear()


async def _send_error(send: Send, exc: CorralError) -> None:
    status, body = error_body(exc)
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _relay(
    route: PortRoute,
    scope: Scope,
    receive: Receive,
    send: Send,
    upstream: _Upstream,
    reused: bool,
) -> None:
    conn, writer = upstream.conn, upstream.writer
    headers = forwarded_headers(scope, route, upgrade=False)
    incoming = {k for k, _ in scope["headers"]}
    if b"content-length" not in incoming and b"transfer-encoding" in incoming:
        headers.append((b"transfer-encoding", b"chunked"))
    request = h11.Request(method=scope["method"], target=route.target, headers=headers)
    # The body goes up while the answer comes down (a server may answer before reading
    # it all); the same task notices when the client goes away, which ends the relay.
    client_gone = asyncio.Event()
    uploading = None
    try:
        writer.write(conn.send(request))
        bodyless = not _has_body(scope)
        if bodyless:  # all sent now (a retry must not wait for a body already taken)
            writer.write(conn.send(h11.EndOfMessage()))
        uploading = asyncio.create_task(_upload(conn, writer, receive, client_gone, bodyless))
        await _download(upstream, send)
    except (h11.ProtocolError, OSError) as exc:
        if client_gone.is_set():
            return
        if upstream.answering:  # the response has begun: cut it
            raise ConnectionError(f"the sandbox's server broke its response: {exc}") from exc
        if reused:
            raise _Stale() from exc
        await _send_error(
            send,
            errors.PortClosed(
                f"the server on port {route.port} of sandbox {route.sandbox_id} closed the "
                f"connection without an answer ({exc}); check its log"
            ),
        )
    finally:
        if uploading is not None:
            uploading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await uploading


async def _upload(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    receive: Receive,
    client_gone: asyncio.Event,
    ended: bool,
) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if conn.their_state is not h11.DONE:
                client_gone.set()
                writer.transport.abort()  # nobody to answer: stop reading the sandbox's
            return
        if ended:
            continue
        body = message.get("body", b"")
        try:
            if body:
                writer.write(conn.send(h11.Data(data=body)))
                await writer.drain()
            if not message.get("more_body", False):
                writer.write(conn.send(h11.EndOfMessage()))
                ended = True
        except (OSError, h11.LocalProtocolError):
            ended = True  # it stopped reading; its answer (or its absence) says why


async def _download(upstream: _Upstream, send: Send) -> None:
    conn, reader = upstream.conn, upstream.reader
    upstream.answering = False
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(_READ_SIZE))
        elif isinstance(event, h11.Response):
            upstream.answering = True
            headers = [(k, v) for k, v in event.headers if k not in HOP_BY_HOP and k != b"date"]
            await send(
                {"type": "http.response.start", "status": event.status_code, "headers": headers}
            )
        elif isinstance(event, h11.Data):
            await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
        elif isinstance(event, h11.EndOfMessage):
            await send({"type": "http.response.body", "body": b""})
            return
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("closed before the end of the response")
        # h11.InformationalResponse (100 Continue): the client's server sends its own.
