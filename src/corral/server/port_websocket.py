"""WebSocket upgrades to a sandbox's port, relayed byte for byte.

uvicorn hands every request that asks for a WebSocket upgrade to its `ws` protocol class,
with the connection itself: the server (`corral.server.main`) names `PortRelay` there.
The request is routed and checked like any port request (`corral.server.ports`), sent on
to the sandbox's server with its token removed, and from then on the two connections
are joined: the handshake's answer, frames, pings and the close all pass through
unchanged, with flow control (a slow reader pauses the other side). No WebSocket code
runs here, so nothing limits what the sandbox's server may speak over the upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from http import HTTPStatus
from typing import Any

import h11

from corral.errors import CorralError, InvalidRequest, NotFound
from corral.server import ports
from corral.server.port_http import PortProxy

log = logging.getLogger("corral.server")

_NOT_A_PORT = NotFound(
    "WebSocket upgrades are served only for sandbox ports: "
    "/sandboxes/<sandbox id>/ports/<port>/<path> or the host <port>-<sandbox id>.<domain>"
)


def relay_protocol(proxy: PortProxy) -> Any:
    """What uvicorn's `ws` option takes: a factory of `PortRelay` bound to `proxy`."""
    return functools.partial(PortRelay, proxy)


class _Upstream(asyncio.Protocol):
    """The connection into the sandbox: what it sends goes to the client."""

    def __init__(self, relay: PortRelay) -> None:
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        self._relay.to_client(data)

    def eof_received(self) -> bool:
        return False  # close it; `connection_lost` closes the client's side

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.upstream_lost()

    def pause_writing(self) -> None:
        self._relay.client_reading(False)

    def resume_writing(self) -> None:
        self._relay.client_reading(True)


class PortRelay(asyncio.Protocol):
    """One client connection that asked for a WebSocket upgrade."""

    def __init__(
        self, proxy: PortProxy, config: Any, server_state: Any, app_state: Any = None
    ) -> None:
        self._proxy = proxy
        self._connections: set[Any] = server_state.connections
        self._client: asyncio.Transport | None = None
        self._upstream: asyncio.Transport | None = None
        self._pending = b""  # what the client sent before the sandbox's side was open
        self._opening: asyncio.Task[None] | None = None

    # -- the client's side ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._client = transport
        self._connections.add(self)  # so that a graceful shutdown closes it

    def data_received(self, data: bytes) -> None:
        if self._upstream is not None:
            self._upstream.write(data)
            return
        self._pending += data
        if self._opening is None and b"\r\n\r\n" in self._pending:
            assert self._client is not None
            self._client.pause_reading()  # until the sandbox's side is open
            self._opening = asyncio.create_task(self._open())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._opening is not None:
            self._opening.cancel()
        if self._upstream is not None:
            self._upstream.close()

    def pause_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: end the relay."""
        if self._client is not None:
            self._client.close()

    # -- joining the sides ------------------------------------------------------------

    def to_client(self, data: bytes) -> None:
        if self._client is not None:
            self._client.write(data)

    def client_reading(self, on: bool) -> None:
        if self._client is not None and not self._client.is_closing():
            (self._client.resume_reading if on else self._client.pause_reading)()

    def upstream_lost(self) -> None:
        if self._client is not None:
            self._client.close()  # after what is buffered for it has been written

    async def _open(self) -> None:
        client = self._client
        assert client is not None
        head, _, rest = self._pending.partition(b"\r\n\r\n")
        self._pending = b""
        try:
            scope = self._scope(head + b"\r\n\r\n", client)
            route = ports.route(scope, self._proxy.domain)
            if route is None:
                raise _NOT_A_PORT
            sock = await self._proxy.open(route)
            try:
                loop = asyncio.get_running_loop()
                upstream, _ = await loop.create_connection(lambda: _Upstream(self), sock=sock)
            except BaseException:
                sock.close()
                raise
        except CorralError as exc:
            self._refuse(exc)
            return
        except Exception:
            log.exception("WebSocket relay failed")
            client.close()
            return
        if client.is_closing():  # the client left meanwhile
            upstream.close()
            return
        self._upstream = upstream
        lines = [f"{scope['method']} ".encode() + route.target + b" HTTP/1.1"]
        lines += [k + b": " + v for k, v in ports.forwarded_headers(scope, route, upgrade=True)]
        upstream.write(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
        client.resume_reading()

    def _scope(self, head: bytes, client: asyncio.Transport) -> dict[str, Any]:
        """The request head as much of an ASGI scope as the routing needs."""
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        try:
            request = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise InvalidRequest(f"malformed request: {exc}") from None
        if not isinstance(request, h11.Request):
            raise InvalidRequest("malformed request")
        path, _, query = bytes(request.target).partition(b"?")
        return {
            "method": request.method.decode(),
            "raw_path": path,
            "path": path.decode("latin-1"),
            "query_string": query,
            "headers": [(k.lower(), v) for k, v in request.headers],
            "client": client.get_extra_info("peername"),
            "scheme": "wss" if client.get_extra_info("sslcontext") else "ws",
        }

    def _refuse(self, exc: CorralError) -> None:
        assert self._client is not None
        status, body = ports.error_body(exc)
        with contextlib.suppress(Exception):
            self._client.write(
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
                + b"content-type: application/json\r\ncache-control: no-store\r\n"
                + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
        self._client.close()
