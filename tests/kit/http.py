"""Loopback HTTP servers for the tests: the callback receiver and its misbehaving kin.

Each runs a real `ThreadingHTTPServer` on 127.0.0.1 and a free port in a thread of the
test process; `close()` stops it (fixtures call it in their teardown).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from corral.store.callback_outbox import CRITICAL_EVENTS


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that logs nothing (the test output stays the test's)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a reply to a client that hung up (a cancelled POST)


class LoopbackHTTP:
    """Serves `handler` on loopback until `close()`; with `tls`, over HTTPS."""

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], tls: ssl.SSLContext | None = None
    ) -> None:
        self._server = _Server(("127.0.0.1", 0), handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]  # lower-cased names
    body: bytes
    status: int  # what the receiver answered

    @property
    def payload(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded

    @property
    def delivery(self) -> int:
        return int(self.headers["x-corral-delivery"])

    @property
    def event(self) -> str:
        return self.headers["x-corral-event"]


class CallbackReceiver(LoopbackHTTP):
    """Records every POST and answers as told: `fail_first` 500s per delivery for critical
    events (all events when `fail_all`), else `ok_status`; it holds each reply until `open`
    is set. With `tls`, it speaks HTTPS."""

    def __init__(
        self, tls: ssl.SSLContext | None = None, *, fail_first: int = 0, ok_status: int = 204
    ) -> None:
        self.received: list[Received] = []
        self.fail_first = fail_first
        self.fail_all = False
        self.ok_status = ok_status
        self.open = threading.Event()
        self.open.set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.read_body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receiver._record(headers, body)
                receiver.open.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler, tls)

    def _record(self, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            delivery = headers["x-corral-delivery"]
            tries = sum(r.headers["x-corral-delivery"] == delivery for r in self.received)
            critical = headers["x-corral-event"] in CRITICAL_EVENTS
            failed = self.fail_all or (critical and tries < self.fail_first)
            status = 500 if failed else self.ok_status
            self.received.append(Received(headers, body, status))
        return status

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def tries(self) -> dict[int, int]:
        """How many POSTs each delivery took."""
        counts: dict[int, int] = {}
        for r in self.requests():
            counts[r.delivery] = counts.get(r.delivery, 0) + 1
        return counts

    def close(self) -> None:
        self.open.set()
        super().close()


class Redirector(LoopbackHTTP):
    """Answers every POST with a redirect to `location`."""

    def __init__(self, location: str) -> None:
        self.posts = 0
        redirector = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.read_body()
                redirector.posts += 1
                self.send_response(307)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        super().__init__(Handler)


class EndlessReplies(LoopbackHTTP):
    """Acknowledges every POST with a 200 whose body never ends."""

    def __init__(self) -> None:
        class Handler(QuietHandler):
            def do_POST(self) -> None:
                self.read_body()
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 40))
                self.end_headers()
                chunk = b"x" * 65536
                try:
                    while True:
                        self.wfile.write(chunk)
                except OSError:
                    return  # the client hung up

        super().__init__(Handler)


class SilentReceiver:
    """A TCP endpoint on loopback that accepts every connection and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join()
        for conn in self.accepted:
            conn.close()
