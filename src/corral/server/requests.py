"""What the server refuses before a handler sees a request: oversized or malformed messages.

Size: connect-python buffers a whole unary body, or a whole streamed message, before it
checks `read_max_bytes`; a client declaring a 4 GiB message would have it buffer 4 GiB.
`limit_size` counts bytes as they arrive (and reads the length prefix of each streamed
envelope) and refuses the request at the first byte past the limit.

Malformed: connect-python reports a body it cannot decode as `unknown`, an internal
error; `strict_codecs` makes that `invalid_argument`, with the decoder's own words.
"""

from __future__ import annotations

from typing import Any

from connectrpc import _codec  # the codec registry has no public hook in 0.9.0
from google.protobuf.message import Message

from corral._wire import to_connect
from corral.errors import InvalidRequest
from corral.server.disconnect import Message as AsgiMessage
from corral.server.disconnect import Receive

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
_STREAM_TYPES = ("application/connect+", "application/grpc")


def _too_large(size: int, limit: int) -> Exception:
    return to_connect(
        InvalidRequest(
            f"request message of {size} bytes is over the limit of {limit} bytes; "
            "send large files with WriteFile in chunks"
        )
    )


class _EnvelopeSizes:
    """Reads the 5-byte prefix (flags, big-endian length) of each streamed message."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
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
                length = int.from_bytes(self._prefix[1:5], "big")
                if length > self._limit:
                    raise _too_large(length, self._limit)
                self._skip = length
                self._prefix.clear()


def limit_size(receive: Receive, headers: dict[bytes, bytes], limit: int) -> Receive:
    content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
    if content_type.startswith(_STREAM_TYPES):
        envelopes = _EnvelopeSizes(limit)

        async def receive_stream() -> AsgiMessage:
            message = await receive()
            if message["type"] == "http.request":
                envelopes.feed(message.get("body", b""))
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


class _StrictCodec:
    """A codec whose decoding errors are the client's fault (`invalid_argument`)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def name(self) -> str:
        return str(self._inner.name())

    def encode(self, message: Message) -> bytes:
        return bytes(self._inner.encode(message))

    def decode(self, data: bytes | bytearray, message: Message) -> Message:
        try:
            return self._inner.decode(data, message)  # type: ignore[no-any-return]
        except Exception as exc:
            what = "JSON" if self.name() == "json" else "protobuf"
            raise to_connect(
                InvalidRequest(f"malformed {what} request for {type(message).__name__}: {exc}")
            ) from None


def strict_codecs() -> None:
    """Make every registered codec strict; idempotent."""
    for name, codec in list(_codec._codecs.items()):
        if not isinstance(codec, _StrictCodec):
            _codec._codecs[name] = _StrictCodec(codec)
