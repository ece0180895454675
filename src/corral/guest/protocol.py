"""The wire protocol between the host and the guest agent: framing, JSON, flow control.

Shared by both sides: the agent inside a sandbox imports it beside ``agent.py`` (standard
library only, Python 3.9 syntax, nothing slow to import), the host client imports it as
``corral.guest.protocol``.

One byte stream each way (the agent's stdin and stdout today, vsock later) carries
frames::

    frame := u32 L (big-endian) | u8 kind | u32 channel | payload (L - 5 bytes)

A payload is at most ``MAX_PAYLOAD`` (1 MiB); a bigger length is a protocol error and
ends the connection.

Kinds (H = host, G = guest):

==========  =======  ==================================================================
CALL   (1)  H → G    JSON ``{"op": ..., **args}``; opens a new channel (never reused
                     while open)
REPLY  (2)  G → H    JSON, final answer; closes the channel. ``{"ok": true, ...}`` or
                     ``{"ok": false, "error": {"type": T, "message": M}}``, T one of
                     ``ERROR_TYPES`` (``unsupported`` has ``"unknown_op": op`` when the
                     op itself is unknown: the host is newer than the agent)
EVENT  (3)  G → H    JSON, intermediate (an exec started: ``{"pid": N}``)
OUT    (4)  G → H    bytes: a command's stdout, or the content of a file being read
ERR    (5)  G → H    bytes: a command's stderr
IN     (6)  H → G    bytes: a command's stdin, or the content of a file being written
EOF    (7)  H → G    no payload: end of IN on that channel
CREDIT (8)  both     u32 N: the receiver of OUT/ERR (the host) or of IN (the guest)
                     lets the sender send N more bytes of them on that channel
CLOSE  (9)  H → G    no payload: the host stops listening on that channel
==========  =======  ==================================================================

Flow control: each side starts every channel with ``WINDOW`` bytes of credit for the
data kinds it sends (OUT+ERR for the guest, IN for the host) and never sends more than
it was granted; the receiver grants credit back as it consumes. Nothing buffers without
bound: a command whose reader stops reading blocks on its own ``write``. Data frames
carry at most ``CHUNK`` bytes. Frames for a channel the receiver no longer has open
(it closed it, or replied) are dropped.

Ops (CALL payloads; paths are absolute or relative to the workdir, never with NUL):

``ping``
    REPLY ``{version, pid, uid, user, workdir}``.
``exec {argv | cmd, env, cwd, user, home, timeout, output_limit, stdin, background, tag}``
    With ``home`` the command starts in its user's home directory, and a relative
    ``cwd`` is resolved from there rather than from the workdir.
    EVENT ``{pid}`` (``null`` if the program could not be started), then OUT/ERR, IN/EOF
    for stdin, then REPLY ``{exit_code, signal, reason, output_bytes, error?}`` with
    reason ``exited``, ``killed``, ``timeout`` or ``output_limit``. A missing program is
    exit code 127 (126 if not executable) with ``error`` and the same text on ERR. CLOSE
    kills a foreground command's process group; a background command goes on.
``attach {pid}``
    Follow a running background command again: EVENT ``{pid}``, OUT/ERR, REPLY as exec.
``input {pid, data, close}``
    Bytes (``data``, base64; the host sends at most ``CHUNK`` a call) for the stdin of a running
    command started with stdin or a pty, followed by a channel or not; ``close`` then
    ends its stdin. REPLY ``{}`` once they are written; ``not_running`` if its stdin
    closed (or it ended) first.
``signal {pid, signal, group}``, ``ps``
    REPLY ``{}``; REPLY ``{processes: [{pid, argv, cmd, tag, background, started_at}]}``.
``read {path, offset, length}``
    EVENT ``{size, mode, mtime}``, OUT chunks, REPLY ``{bytes}``.
``write {path, mode, append, make_parents}``
    IN chunks and EOF from the host, then REPLY ``{bytes, entry}``. Both take regular
    files only: a FIFO, socket or device is refused (``invalid_argument``), never waited on.
``list {path, depth}``
    Zero or more EVENT ``{entries}`` batches, then REPLY ``{entries}``.
``stat {path}``, ``mkdir {path}``, ``remove {path, recursive}``, ``rename {src, dst, overwrite}``
    REPLY ``{entry}``, ``{created}``, ``{}``, ``{entry}``. A rename across mounts copies
    and then removes the source, as ``mv`` does, and replies when that is done.

``connect {port}``
    A TCP connection to 127.0.0.1:port (else [::1]:port) inside the sandbox (the port
    proxy's path where the host cannot enter the sandbox's network): EVENT
    ``{connected: true}``, then OUT
    what the peer sends and IN what it is sent (EOF shuts its write side), then REPLY
    ``{}`` when the peer has closed. Error ``refused`` when nothing listens there.

An entry is ``{name, path, type: file|dir|symlink|other, size, mode, mtime,
symlink_target?}`` with lstat semantics.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

VERSION = 1

CALL = 1
REPLY = 2
EVENT = 3
OUT = 4
ERR = 5
IN = 6
EOF = 7
CREDIT = 8
CLOSE = 9
KIND_NAMES = {
    CALL: "CALL",
    REPLY: "REPLY",
    EVENT: "EVENT",
    OUT: "OUT",
    ERR: "ERR",
    IN: "IN",
    EOF: "EOF",
    CREDIT: "CREDIT",
    CLOSE: "CLOSE",
}

HEADER_SIZE = 9
MAX_PAYLOAD = 1 << 20
WINDOW = 256 * 1024
CHUNK = 64 * 1024

ERROR_TYPES = (
    "not_found",
    "exists",
    "not_a_directory",
    "is_a_directory",
    "permission_denied",
    "not_empty",
    "no_space",
    "invalid_argument",
    "not_running",
    "refused",
    "unsupported",
    "needs_root",
    "unknown_user",
    "internal",
)

_header = struct.Struct(">IBI")
_credit = struct.Struct(">I")
unpack_header = _header.unpack_from


class ProtocolError(ValueError):
    """The peer sent bytes that are not valid frames; the connection cannot go on.

    Internal to the protocol: the host client turns it into ``corral.errors.GuestError``.
    """


def encode_frame(kind: int, channel: int, payload: bytes = b"") -> bytes:
    """One frame: header and payload."""
    return _header.pack(len(payload) + 5, kind, channel) + payload


def encode_header(kind: int, channel: int, payload_size: int) -> bytes:
    """A frame header alone, for a payload the caller writes right after it."""
    return _header.pack(payload_size + 5, kind, channel)


def check_header(length: int, kind: int) -> int:
    """Validate a decoded header; return the payload size."""
    if length < 5 or length - 5 > MAX_PAYLOAD:
        raise ProtocolError(f"frame length {length} is outside 5..{MAX_PAYLOAD + 5}")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"unknown frame kind {kind}")
    return length - 5


def encode_credit(amount: int) -> bytes:
    return _credit.pack(amount)


def decode_credit(payload: bytes) -> int:
    if len(payload) != 4:
        raise ProtocolError(f"CREDIT payload must be 4 bytes, got {len(payload)}")
    value: int = _credit.unpack(payload)[0]
    return value


class FrameDecoder:
    """Split a byte stream into frames: feed it bytes, get ``(kind, channel, payload)``."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        start = 0
        end = len(buffer)
        while end - start >= HEADER_SIZE:
            length, kind, channel = unpack_header(buffer, start)
            size = check_header(length, kind)
            if end - start - HEADER_SIZE < size:
                break
            body = start + HEADER_SIZE
            frames.append((kind, channel, bytes(buffer[body : body + size])))
            start = body + size
        if start:
            del buffer[:start]
        return frames


# -- JSON --------------------------------------------------------------------------------
# `import json` costs ~6 ms (it pulls in `re` and `enum`), a third of the agent's start
# budget. The C accelerator `_json` alone is enough for our payloads; if this
# interpreter's `_json` differs, fall back to `json` (checked once, at import).


def _fast_json() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    import _json

    def refuse(value: object) -> object:
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    def constant(name: str) -> float:
        return float(name)

    class Context:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = staticmethod(constant)

    context: Any = Context()
    scan = _json.make_scanner(context)
    encode = _json.make_encoder(
        None, refuse, _json.encode_basestring_ascii, None, ":", ",", False, False, True
    )

    def dumps(value: Any) -> bytes:
        return "".join(encode(value, 0)).encode("ascii")

    def loads(data: bytes) -> Any:
        text = data.decode("utf-8")
        try:
            value, end = scan(text, 0)
        except StopIteration as exc:
            raise ValueError(f"invalid JSON at offset {exc.value}") from None
        except SystemError:  # 3.11's scanner reports errors via json.decoder, not imported
            raise ValueError("invalid JSON") from None
        if text[end:].strip():
            raise ValueError(f"extra data after JSON at offset {end}")
        return value

    sample = {"a": [1, -2.5, None, True, False, "\u00e9\n\udcff"], "b": {}}
    if dumps(sample) != (b'{"a":[1,-2.5,null,true,false,"\\u00e9\\n\\udcff"],"b":{}}'):
        raise ImportError("unexpected _json encoder")
    if loads(dumps(sample)) != sample:
        raise ImportError("unexpected _json scanner")
    return dumps, loads


def _stdlib_json() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    import json

    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode("ascii")

    def loads(data: bytes) -> Any:
        return json.loads(data.decode("utf-8"))

    return dumps, loads


try:
    encode_json, decode_json = _fast_json()
except Exception:  # another interpreter's private `_json`: use the public module
    encode_json, decode_json = _stdlib_json()
