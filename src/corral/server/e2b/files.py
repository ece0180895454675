"""envd's HTTP `/files`: download (`GET`) and upload (`POST`) of a sandbox's files.

    GET  /files?path=&username=     the file's bytes, streamed (gzip when accepted and
                                    the file's start compresses, else identity);
                                    404 {"code":404,"message"} when it is missing
    POST /files?path=&username=     multipart/form-data (each part named `file`, its
                                    filename the target path unless ?path= names it) or
                                    application/octet-stream with ?path=; a gzip
                                    Content-Encoding is decoded. Answers
                                    [{"path","name","type":"file","metadata"?}]

Paths are relative to the user's home; `username` (else the call's user, else the
template's default user) owns what is written. Uploads stream into the sandbox as they
arrive (memory stays bounded whatever their size), write the file in place as envd does
(a watcher sees create, chmod, write) and replace its metadata with the request's
`X-Metadata-<key>` headers (none: the file's metadata is cleared).
"""

from __future__ import annotations

import contextlib
import urllib.parse
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from python_multipart.multipart import MultipartParser, parse_options_header

from corral.errors import CorralError, IsADirectory, NoSpace
from corral.server.disconnect import Receive
from corral.server.e2b.call import EnvdCall
from corral.server.e2b.entries import written
from corral.server.e2b.errors import E2bError, rest_status
from corral.server.e2b.rest import error_body, send_json

if TYPE_CHECKING:
    from corral.sandboxes import SandboxManager
    from corral.server.base import Services

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_METADATA_HEADER = "x-metadata-"
_CHUNK = 64 * 1024


async def serve(
    services: Services, call: EnvdCall, scope: Scope, receive: Receive, send: Send
) -> None:
    manager = services.manager
    assert manager is not None  # the call was resolved: the server runs
    query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode(), True))
    headers = {
        bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
        for k, v in scope.get("headers", ())
    }
    user = query.get("username") or call.user
    try:
        if scope["method"] == "GET":
            await _download(manager, call, user, query, headers, send)
        elif scope["method"] == "POST":
            found = await _upload(manager, call, user, query, headers, receive)
            await send_json(send, 200, found)
        else:
            raise E2bError(405, "/files takes GET (download) or POST (upload)")
    except CorralError as exc:
        status = _status(exc)
        await send_json(send, status, error_body(status, str(exc)))


def _status(exc: CorralError) -> int:
    if isinstance(exc, NoSpace):
        return 507  # envd's "not enough disk space"; 429 would make the SDK retry
    if isinstance(exc, IsADirectory):
        return 400
    return rest_status(exc)


def _path(query: dict[str, str]) -> str:
    path = query.get("path", "")
    if not path:
        raise E2bError(400, "name the file with ?path= (relative paths are from the home)")
    if "\0" in path:
        raise E2bError(400, "the path contains a NUL character, which no path may hold")
    return path


# -- download -------------------------------------------------------------------------


async def _download(
    manager: SandboxManager,
    call: EnvdCall,
    user: str | None,
    query: dict[str, str],
    headers: dict[str, str],
    send: Send,
) -> None:
    chunks = manager.files.read_file(call.team, call.sandbox_id, _path(query), user=user, home=True)
    async with contextlib.aclosing(chunks):
        first = await anext(chunks, b"")  # a missing file fails here, first
        gzip = "gzip" in headers.get("accept-encoding", "") and _compresses(first)
        head = [(b"content-type", b"application/octet-stream")]
        if gzip:
            head.append((b"content-encoding", b"gzip"))
        await send({"type": "http.response.start", "status": 200, "headers": head})
        # An error from here on breaks the response off (the client sees a transport
        # failure, as when E2B's envd dies mid-download), never a second answer.
        compressor = zlib.compressobj(_GZIP_LEVEL, wbits=31) if gzip else None
        data: bytes | None = first
        while data is not None:
            out = compressor.compress(data) if compressor is not None else data
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            data = await anext(chunks, None)
        tail = compressor.flush() if compressor is not None else b""
        await send({"type": "http.response.body", "body": tail})


# Level 1: on a loopback or LAN link the compressor, not the wire, is the bottleneck; the
# default level (6) took ~5x as long as sending a 10 MB file as it is.
_GZIP_LEVEL = 1
# gzip is chosen only when the file's first chunk shrinks by at least this much; data
# that is already compressed or random (archives, images, binaries) goes as it is.
_GZIP_WORTH = 0.9


def _compresses(sample: bytes) -> bool:
    """Whether gzip pays for a file that starts with `sample` (Accept-Encoding lets the
    server answer identity whatever the client accepts)."""
    sample = sample[:_CHUNK]
    if len(sample) < 256:  # gzip's header and trailer would outweigh what it saves
        return False
    return len(zlib.compress(sample, _GZIP_LEVEL)) < len(sample) * _GZIP_WORTH


# -- upload ---------------------------------------------------------------------------


async def _upload(
    manager: SandboxManager,
    call: EnvdCall,
    user: str | None,
    query: dict[str, str],
    headers: dict[str, str],
    receive: Receive,
) -> list[dict[str, object]]:
    metadata = _metadata(headers)
    body = _body(receive)
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding == "gzip":
        body = _gunzip(body)
    elif encoding not in ("", "identity"):
        raise E2bError(400, f"Content-Encoding {encoding!r} is not supported: send gzip or none")
    content_type, options = parse_options_header(headers.get("content-type", ""))

    async def write(path: str, data: AsyncIterator[bytes]) -> dict[str, object]:
        # The file is truncated when the write starts: a body that is bad from its first
        # bytes (not gzip, say) is refused before that, changing nothing.
        data = await _peeked(data)
        info = await manager.files.write_file(
            call.team, call.sandbox_id, path, data,
            in_place=True, metadata=metadata, user=user, home=True,
        )  # fmt: skip
        return written(info)

    if content_type == b"multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise E2bError(400, "the multipart/form-data Content-Type names no boundary")
        parts = Parts(body, boundary)
        found = []
        while (filename := await parts.next_file()) is not None:
            path = query.get("path") or filename
            if not path:
                raise E2bError(400, "a file part has no filename; name its target path there")
            found.append(await write(path, parts.data()))
        if not found:
            raise E2bError(400, "the multipart body has no part named `file`")
        return found
    if content_type in (b"application/octet-stream", b""):
        return [await write(_path(query), body)]
    raise E2bError(
        400,
        f"Content-Type {content_type.decode('latin-1')!r} is not an upload: send "
        "multipart/form-data (field `file`) or application/octet-stream with ?path=",
    )


def _metadata(headers: dict[str, str]) -> dict[str, str]:
    """The file metadata of `X-Metadata-<key>` headers (keys lower-cased, as envd)."""
    metadata: dict[str, str] = {}
    for name, value in headers.items():
        if not name.startswith(_METADATA_HEADER):
            continue
        key = name[len(_METADATA_HEADER) :]
        printable = all(" " < c <= "~" for c in key) and all(" " <= c <= "~" for c in value)
        if not key or not printable:
            raise E2bError(400, f"metadata {key!r} must be printable ASCII (keys without spaces)")
        metadata.setdefault(key, value)
    return metadata


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise E2bError(400, "the client disconnected before sending its whole upload")
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _peeked(data: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`data` with its first chunk already read (its errors raised now)."""
    first = await anext(data, None)

    async def rest() -> AsyncIterator[bytes]:
        if first is None:
            return
        yield first
        async for chunk in data:
            yield chunk

    return rest()


async def _gunzip(body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The decoded body, at most `_CHUNK` bytes at a time (a small bomb stays small)."""
    decoder = zlib.decompressobj(wbits=31)
    try:
        async for chunk in body:
            pending = chunk
            while pending and not decoder.eof:
                out = decoder.decompress(pending, _CHUNK)
                pending = decoder.unconsumed_tail
                if out:
                    yield out
        if not decoder.eof:
            raise E2bError(400, "the gzip body ends before its end: send it whole")
    except zlib.error as exc:
        raise E2bError(400, f"the body is not valid gzip ({exc})") from None


class Parts:
    """A multipart/form-data body read as a stream: each part named `file` in turn
    (`next_file`), then its bytes (`data`); others are skipped. Nothing is buffered
    beyond what one chunk of the body holds."""

    def __init__(self, body: AsyncIterator[bytes], boundary: bytes) -> None:
        self._body = body
        self._events: deque[tuple[str, bytes]] = deque()
        self._field = bytearray()
        self._value = bytearray()
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": lambda: self._events.append(("begin", b"")),
                "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": lambda: self._events.append(("headers", b"")),
                "on_part_data": lambda d, s, e: self._events.append(("data", bytes(d[s:e]))),
                "on_part_end": lambda: self._events.append(("end", b"")),
            },
        )
        self._disposition = b""

    def _header_end(self) -> None:
        # As an event: the parser runs ahead of the reader (a whole chunk at a time).
        if self._field.lower() == b"content-disposition":
            self._events.append(("disposition", bytes(self._value)))
        self._field.clear()
        self._value.clear()

    async def _next_event(self) -> tuple[str, bytes] | None:
        while not self._events:
            if self._ended:
                return None
            chunk = await anext(self._body, None)
            if chunk is None:
                self._ended = True
                self._parser.finalize()
                continue
            try:
                self._parser.write(chunk)
            except Exception as exc:  # python-multipart's parse errors
                raise E2bError(400, f"the multipart body is malformed ({exc})") from None
        return self._events.popleft()

    async def next_file(self) -> str | None:
        """The filename of the next part named `file` (data of the part before that
        nobody read is skipped); None after the last part."""
        while (found := await self._next_event()) is not None:
            kind, payload = found
            if kind == "begin":
                self._disposition = b""
            elif kind == "disposition":
                self._disposition = payload
            elif kind == "headers":
                _, options = parse_options_header(self._disposition)
                if options.get(b"name") == b"file":
                    return options.get(b"filename", b"").decode("utf-8", "replace")
        return None

    async def data(self) -> AsyncIterator[bytes]:
        """The bytes of the part `next_file` found, up to its end."""
        while (found := await self._next_event()) is not None:
            kind, payload = found
            if kind == "end":
                return
            if kind == "data" and payload:
                yield payload
        raise E2bError(400, "the multipart body ends inside a part: send it whole")
