"""gzip request bodies, inflated with a bound and off the event loop.

connectrpc's own gzip (0.13) stops inflating at `read_max_bytes` and calls corrupt gzip
`invalid_argument`, but it inflates on the event loop, and it reads concatenated gzip
members one at a time, copying what is left of the body for each: 8 MiB of empty members
took 393 s of CPU (measured once, load 12-17). Here:

- `BoundedGzip` stops inflating at the message limit (`resource_exhausted`), calls corrupt
  gzip `invalid_argument` and takes one member only; every service registers it through
  connectrpc's `compressions` hook (a GET request's `compression=gzip` is inflated by it),
  so nothing reaches connectrpc's own gzip.
- `inflate` does that work before connectrpc sees the request, in a thread of its own:
  a unary body, or each compressed message of a stream, is handed on inflated, and the
  request's encoding header is dropped. Even a bounded inflate is ~10-100 ms of CPU for
  8 MiB (a few KiB on the wire), which the loop of every other request must not pay.
  It buffers a whole body or message first: `corral.server.requests.limit_size`, ahead
  of it, bounds that on the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import struct
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from corral._wire import to_connect
from corral.errors import InvalidRequest
from corral.server.disconnect import Message, Receive

Scope = dict[str, Any]

_STREAM_TYPES = (b"application/connect+", b"application/grpc")
# Where a request names its compression: unary Connect; streaming Connect; gRPC-Web.
_ENCODING_HEADERS = (b"content-encoding", b"connect-content-encoding", b"grpc-encoding")
# Two threads: a flood of bombs waits for these, not for the loop or the default executor.
_INFLATERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="corral-inflate")


class BoundedGzip:
    """gzip that inflates at most `limit` bytes (a `connectrpc.compression.Compression`).

    One gzip member only: concatenated members are legal gzip but no Connect client sends
    them, and a body of half a million empty members would cost as many rounds of a loop
    (connectrpc's own takes minutes over them).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def name(self) -> str:
        return "gzip"

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return gzip.compress(data, compresslevel=6)

    def decompress(
        self, data: bytes | bytearray | memoryview, read_max_bytes: int | None = None
    ) -> bytes:
        limit = self._limit if read_max_bytes is None else min(self._limit, read_max_bytes)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip header and trailer
        try:
            out = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise to_connect(
                InvalidRequest(f"malformed gzip request body ({exc}); send valid gzip or none")
            ) from None
        if len(out) > limit:
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"request message decompresses to more than the limit of {limit} bytes; "
                "send large files with WriteFile in chunks",
            )
        if not inflater.eof:
            raise to_connect(InvalidRequest("truncated gzip request body: the stream ends early"))
        if inflater.unused_data:
            raise to_connect(
                InvalidRequest(
                    f"{len(inflater.unused_data)} bytes after the end of the gzip request body; "
                    "send one gzip stream"
                )
            )
        return out


def gzip_declared(headers: dict[bytes, bytes], *, stream: bool) -> bool:
    """Whether the request says its body (unary) or its flagged messages (stream) are gzip:
    the unary header in any letter case (HTTP's content-codings are; connectrpc would call
    `GZIP` an unknown compression), the stream's exactly, as connectrpc reads them."""
    if not stream:
        return headers.get(b"content-encoding", b"").lower() == b"gzip"
    return b"gzip" in (headers.get(b"connect-content-encoding"), headers.get(b"grpc-encoding"))


def inflate(scope: Scope, receive: Receive, limit: int) -> tuple[Scope, Receive]:
    """The request as connectrpc should see it: gzip already inflated (up to `limit`
    bytes a message), its encoding header gone. Other requests are left as they are."""
    headers = dict(scope.get("headers", ()))
    stream = headers.get(b"content-type", b"").lower().startswith(_STREAM_TYPES)
    if not gzip_declared(headers, stream=stream):
        return scope, receive
    plain = {
        **scope,
        "headers": [(k, v) for k, v in scope["headers"] if k not in _ENCODING_HEADERS],
    }
    run = _inflater(BoundedGzip(limit))
    return plain, (_inflate_stream(receive, run) if stream else _inflate_unary(receive, run))


def _inflater(gz: BoundedGzip) -> Callable[[bytes], Awaitable[bytes]]:
    async def run(data: bytes) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(_INFLATERS, gz.decompress, data)

    return run


def _inflate_unary(receive: Receive, run: Callable[[bytes], Awaitable[bytes]]) -> Receive:
    done = False

    async def receive_inflated() -> Message:
        nonlocal done
        if done:  # the body was handed on: what follows is a disconnect
            return await receive()
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        done = True
        data = await run(bytes(body)) if body else b""
        return {"type": "http.request", "body": data, "more_body": False}

    return receive_inflated


def _inflate_stream(receive: Receive, run: Callable[[bytes], Awaitable[bytes]]) -> Receive:
    """Each whole message of the stream, inflated when flagged and re-framed unflagged."""
    pending = bytearray()

    async def receive_inflated() -> Message:
        message = await receive()
        if message["type"] != "http.request":
            return message
        pending.extend(message.get("body", b""))
        out = bytearray()
        while len(pending) >= 5:
            flags, length = struct.unpack(">BI", pending[:5])
            if len(pending) < 5 + length:
                break
            payload = bytes(pending[5 : 5 + length])
            del pending[: 5 + length]
            if flags & 0x01:
                payload = await run(payload)
                flags &= ~0x01
            out += struct.pack(">BI", flags, len(payload)) + payload
        more = bool(message.get("more_body", False))
        if not more:  # a message cut short: the size check has refused it already
            out += pending
        return {"type": "http.request", "body": bytes(out), "more_body": more}

    return receive_inflated
