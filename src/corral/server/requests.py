"""What the server refuses before a handler sees a request: callers without a valid key,
oversized, compressed-bomb or malformed messages.

Key: a Sandbox or Job RPC from a caller without a valid API key is refused before one
byte of its body is read (`refuse`), so an anonymous client cannot make the server buffer
or decompress anything. HealthService needs no key; its messages are limited to 64 KiB.

Size: connectrpc (0.13) counts a unary body as it arrives and reads each streamed
message's length prefix before buffering it, refusing past `read_max_bytes`; but it sees
the request only after `corral.server.compression.inflate`, which buffers a whole gzip
body, or a whole compressed message, before inflating it. So `limit_size` counts the bytes
on the wire, ahead of both: a declared Content-Length or a length prefix over the limit is
refused before the message is read, an undeclared body at its first byte past the limit,
with what to send instead.

Compression (inflating is `corral.server.compression`'s): a compressed flag on a streamed
message of a request that declared no compression is `invalid_argument` (connectrpc
answers `internal`).

Malformed: connectrpc answers a body its codec cannot decode `invalid_argument`, with the
decoder's own words; `CODECS` are Google protobuf's, the JSON one refusing fields the
message does not have (a misspelt field is a mistake to report, not to drop). A header
value that is not UTF-8 makes connectrpc raise out of the app (the HTTP server's bare 500):
`header_problem` refuses it first. (A gRPC timeout it cannot parse, it answers
`invalid_argument` itself.)
"""

from __future__ import annotations

from collections.abc import Iterable

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.errors import ConnectError

from corral._wire import to_connect
from corral.errors import InvalidRequest
from corral.server.compression import gzip_declared
from corral.server.disconnect import Message as AsgiMessage
from corral.server.disconnect import Receive

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
HEALTH_MESSAGE_BYTES = 64 * 1024  # a CheckRequest is empty
_STREAM_TYPES = ("application/connect+", "application/grpc")
CODECS: list[Codec] = [
    google_protobuf_binary_codec(),
    google_protobuf_json_codec(ignore_unknown_fields=False),
]


def _too_large(size: int, limit: int) -> Exception:
    # resource_exhausted, as connect-go answers, and as a message that inflates past the
    # limit is answered (corral.server.compression).
    return ConnectError(
        Code.RESOURCE_EXHAUSTED,
        f"request message of {size} bytes is over the limit of {limit} bytes; "
        "send large files with WriteFile in chunks",
    )


def header_problem(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """What is wrong with a request's headers that connectrpc would fail on with an
    internal error: a value that is not UTF-8."""
    for name, value in headers:
        try:
            value.decode()
        except UnicodeDecodeError:
            return f"the value of header {name.decode('latin-1')!r} is not UTF-8"
    return None


def refuse(error: Exception) -> Receive:
    """A `receive` that raises `error` at once: connectrpc answers it in the form the
    request's protocol expects, without reading the body."""

    async def receive_refused() -> AsgiMessage:
        raise error

    return receive_refused


class _Envelopes:
    """Reads the 5-byte prefix (flags, big-endian length) of each streamed message."""

    def __init__(self, limit: int, compressed: bool) -> None:
        self._limit = limit
        self._compressed = compressed  # whether the stream declared a compression
        self._prefix = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> None:
        i, end = 0, len(data)
        while i < end:
            if self._skip:
                step = min(self._skip, end - i)
                self._skip -= step
                i += step
                continue
            take = min(5 - len(self._prefix), end - i)
            self._prefix += data[i : i + take]
            i += take
            if len(self._prefix) == 5:
                if self._prefix[0] & 0x01 and not self._compressed:
                    raise to_connect(
                        InvalidRequest(
                            "a streamed message has the compressed flag but the request "
                            "declared no compression: send Connect-Content-Encoding: gzip "
                            "(gRPC-Web: grpc-encoding: gzip) or clear the flag"
                        )
                    )
                length = int.from_bytes(self._prefix[1:5], "big")
                if length > self._limit:
                    raise _too_large(length, self._limit)
                self._skip = length
                self._prefix.clear()

    def end(self) -> None:
        """The body ended: it must not end inside a message."""
        if self._prefix or self._skip:
            raise to_connect(
                InvalidRequest(
                    "the request body ends inside a streamed message: each message is a "
                    "5-byte prefix (flags, big-endian length) and exactly that many bytes"
                )
            )


def limit_size(receive: Receive, headers: dict[bytes, bytes], limit: int) -> Receive:
    content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
    if content_type.startswith(_STREAM_TYPES):
        envelopes = _Envelopes(limit, compressed=gzip_declared(headers, stream=True))

        async def receive_stream() -> AsgiMessage:
            message = await receive()
            if message["type"] == "http.request":
                envelopes.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    envelopes.end()
            return message

        return receive_stream

    declared = headers.get(b"content-length", b"")
    total = int(declared) if declared.isdigit() else 0

    async def receive_unary() -> AsgiMessage:
        nonlocal total
        if total > limit:
            raise _too_large(total, limit)
        message = await receive()
        if message["type"] == "http.request" and not declared:
            total += len(message.get("body", b""))
            if total > limit:
                raise _too_large(total, limit)
        return message

    return receive_unary
