"""A web app for inside a sandbox, standard library only: `python3 webapp.py PORT`.

It answers every HTTP request with JSON describing it (method, path and query, headers,
the body's length and SHA-256) on a kept-alive connection; after `/bye` it drops the
next request on that connection unanswered (as a server does that closes an idle
connection just as a request comes);
`/stream?n=N` with N chunks of a chunked response (`/forever?mark=PATH`: chunks until
a write fails, then it creates PATH); and a WebSocket upgrade with an echo of every
message until the client closes. Tests copy this
file into a sandbox (`SOURCE`) and reach it through the port proxy.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

SOURCE = Path(__file__).read_text()
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


class LineReader(Reader, Protocol):
    def readline(self) -> bytes: ...


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # a response in one write (flushed after each), not a write per line

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _any(self) -> None:
        if getattr(self, "drop_next", False):
            self.close_connection = True
            return
        if self.headers.get("Upgrade", "").lower() == "websocket":
            self._websocket()
            return
        target = urlsplit(self.path)
        if target.path == "/stream":
            self._stream(int(parse_qs(target.query).get("n", ["3"])[0]))
            return
        if target.path == "/forever":
            try:
                self._stream(1 << 40)
            except OSError:  # the reader went away
                Path(parse_qs(target.query)["mark"][0]).touch()
            return
        body = self._body()
        described = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        data = json.dumps(described).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.drop_next = target.path == "/bye"

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _stream(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(n):
            chunk = f"chunk {i}\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            if n > 1000:
                time.sleep(0.01)  # an endless stream: a chunk every 10 ms
        self.wfile.write(b"0\r\n\r\n")

    def _websocket(self) -> None:
        key = self.headers["Sec-WebSocket-Key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            opcode, payload = read_frame(self.rfile)
            self.wfile.write(frame(opcode, payload))
            self.wfile.flush()
            if opcode == 8:  # close: answered, done
                self.close_connection = True
                return


def read_frame(stream: Reader) -> tuple[int, bytes]:
    """One WebSocket frame (opcode, unmasked payload); FIN is assumed."""
    first, second = stream.read(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", stream.read(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", stream.read(8))
    mask = stream.read(4) if second & 0x80 else b"\0\0\0\0"
    data = stream.read(length)
    return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final WebSocket frame; masked (as a client must) when `mask` is given."""
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if len(payload) < 126:
        head += bytes([bit | len(payload)])
    elif len(payload) < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", len(payload))
    if mask:
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


def upgrade_request(host: str, target: str, headers: dict[str, str]) -> bytes:
    """A client's WebSocket upgrade request for `target` on `host`."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_head(stream: LineReader) -> tuple[int, dict[str, str]]:
    """The status and headers of an HTTP response head read from `stream`."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
