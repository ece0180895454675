"""A seeded fuzzer of the Connect API, for `tests/test_fuzz.py` (short) and
`benchmarks/fuzz.py` (long).

Every RPC of SandboxService, JobService and HealthService gets requests built from its
own input message (read from the generated descriptors) and then broken: wrong types,
boundary and huge numbers, NaN, long and odd strings, deep nesting, unknown fields,
random and mutated protobuf, bad and bomb gzip, unknown encodings, a compressed flag with
no encoding, truncated envelopes and lying lengths, odd content types, HTTP methods and
headers, with and without a valid key. The same seed sends the same requests.

A request counts as a server error when the answer is HTTP 500 or a Connect
`internal`, `unknown` or `data_loss`, or when the connection drops without an answer; a
hang when no answer comes within the per-request timeout. `unimplemented` (HTTP 501, e.g.
an unknown compression, as the Connect protocol asks) and `unavailable` are counted by
code but are not server errors.

Only loopback: the fuzzer talks to the server URL it is given and nothing else.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import random
import struct
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from corral.v1 import health_pb2, jobs_pb2, sandbox_pb2

SERVER_ERROR_CODES = {"internal", "unknown", "data_loss"}
GRPC_CODES = [
    "ok",
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
]
# Commands the fuzzer may run in its own sandbox: quick, never reading stdin.
HARMLESS_COMMANDS = ["true", "echo hi", "exit 3", "ls /", "cat /etc/hostname", "printf x >&2"]


@dataclass(frozen=True)
class Target:
    """One RPC: its URL path, input message and streaming shape."""

    path: str
    name: str
    input: Descriptor
    client_streaming: bool
    server_streaming: bool


def targets() -> list[Target]:
    found = []
    for module in (sandbox_pb2, jobs_pb2, health_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append(_target(service.full_name, method))
    return found


def _target(service: str, method: MethodDescriptor) -> Target:
    return Target(
        path=f"/{service}/{method.name}",
        name=f"{service.rsplit('.', 1)[-1]}/{method.name}",
        input=method.input_type,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


@dataclass
class Ids:
    """Real ids of the fuzzer's own sandbox and job, so handlers get past their lookups."""

    sandbox: str = "sb_0123456789abcdef0123"
    job: str = "j0123456789abcdef0123"


@dataclass
class Request:
    kind: str  # what was broken, for the report
    target: str
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    query: str = ""


# -- values ---------------------------------------------------------------------------------

_INTS = [0, 1, -1, 7, 255, 2**31 - 1, -(2**31), 2**31, 2**32 - 1, 2**32, 2**53 + 1]
_INTS += [2**63 - 1, -(2**63), 2**63, 2**64, 10**30, -(10**30)]
_FLOATS: list[Any] = [0, -0.0, 0.5, 1e-300, 1e300, -1e300, 86400.5, 2.5e6, 3e9]
_FLOATS += ["NaN", "Infinity", "-Infinity", "1e400", "nan"]
_STRINGS = [
    "",
    " ",
    "a",
    "/",
    ".",
    "..",
    "../../../etc/passwd",
    "/etc/hostname",
    "/tmp/fuzz",
    "/tmp/fuzz/nested/dir",
    "a\x00b",
    "\u00e9\u4e2d\U0001f600",
    "\ud800",
    "\\",
    "%00",
    "${HOME}",
    "$(id)",
    "\n",
    "host",
    "python",
    "namespace",
    "process",
    "auto",
    "gvisor",
    "none",
    "command",
    "shell",
    "code",
    "workflow",
    "sh",
    "bash",
    "IDLE_ACTION_PAUSE",
    "http://127.0.0.1:1/cb",
    "sb_",
    "j",
]


class Values:
    """Random JSON values for message fields, right-typed or not."""

    def __init__(self, rng: random.Random, ids: Ids) -> None:
        self.rng = rng
        self.ids = ids

    def string(self, name: str = "") -> str:
        rng = self.rng
        if name == "sandbox_id" and rng.random() < 0.7:
            return self.ids.sandbox
        if name == "job_id" and rng.random() < 0.7:
            return self.ids.job
        if name == "cmd" and rng.random() < 0.6:
            return rng.choice(HARMLESS_COMMANDS)
        roll = rng.random()
        if roll < 0.5:
            return rng.choice(_STRINGS)
        if roll < 0.8:
            return "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 40)))
        if roll < 0.99:
            return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(1, 40)))
        return "x" * rng.choice([4096, 65536, 1 << 20])

    def scalar(self, fd: FieldDescriptor) -> Any:
        rng = self.rng
        t = fd.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.string(fd.name)
        if t == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return rng.choice(_FLOATS) if rng.random() < 0.6 else rng.uniform(-1e6, 1e6)
        if t == FieldDescriptor.TYPE_BYTES:
            if rng.random() < 0.2:
                return "not base64!*"
            size = rng.choice([0, 1, 10, 1000]) if rng.random() < 0.98 else 200_000
            return base64.b64encode(rng.randbytes(size)).decode()
        if t == FieldDescriptor.TYPE_ENUM:
            assert fd.enum_type is not None  # an enum field has its enum's descriptor
            names = [v.name for v in fd.enum_type.values]
            return rng.choice([*names, "NOT_A_VALUE", 999, -1, 0])
        if t == FieldDescriptor.TYPE_MESSAGE:
            assert fd.message_type is not None  # a message field has its message's descriptor
            return self.message(fd.message_type, depth=1)
        value = rng.choice(_INTS) if rng.random() < 0.7 else rng.randrange(-1000, 1000)
        return str(value) if rng.random() < 0.2 else value  # JSON allows int64s as strings

    def wrong(self) -> Any:
        """A JSON value of an arbitrary type."""
        return self.rng.choice(
            [None, True, 1.5, -7, "str", [], [1, "a"], {}, {"a": {"b": []}}, "1e999"]
        )

    def field(self, fd: FieldDescriptor, depth: int) -> Any:
        rng = self.rng
        if rng.random() < 0.08:
            return self.wrong()
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = (
                fd.message_type.fields_by_name["key"],
                fd.message_type.fields_by_name["value"],
            )
            count = rng.choice([100, 5000]) if rng.random() < 0.02 else rng.randrange(4)
            return {str(self.scalar(key_fd)) + str(i): self.scalar(value_fd) for i in range(count)}
        if fd.is_repeated:
            count = rng.choice([1000, 20000]) if rng.random() < 0.02 else rng.randrange(4)
            if count > 100:
                return [self.scalar(fd)] * count if fd.message_type is None else [{}] * count
            return [self.one(fd, depth) for _ in range(count)]
        return self.one(fd, depth)

    def one(self, fd: FieldDescriptor, depth: int) -> Any:
        if fd.message_type is None:
            return self.scalar(fd)
        name = fd.message_type.full_name
        if name == "google.protobuf.Struct":
            return self.nested(self.rng.choice([1, 5, 50, 200]))
        if name == "google.protobuf.Timestamp":
            return self.rng.choice(["2026-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "bogus", 5])
        return self.message(fd.message_type, depth + 1)

    def nested(self, depth: int) -> Any:
        value: Any = "leaf"
        for i in range(depth):
            value = {"k": value} if i % 2 else [value]
        return {"deep": value}

    def message(self, descriptor: Descriptor, depth: int = 0) -> dict[str, Any]:
        rng = self.rng
        out: dict[str, Any] = {}
        if depth > 4:
            return out
        for fd in descriptor.fields:
            if rng.random() < 0.6:
                out[fd.json_name if rng.random() < 0.9 else fd.name] = self.field(fd, depth)
        if rng.random() < 0.05:
            out["noSuchField"] = self.wrong()
        return out


# -- bodies ---------------------------------------------------------------------------------


def _deep_json(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


def _as_proto(descriptor: Descriptor, data: dict[str, Any]) -> bytes:
    """`data` as binary protobuf, as far as it is valid (the rest is dropped)."""
    cls: Callable[[], Message] = GetMessageClass(descriptor)
    message = cls()
    for key, value in data.items():
        try:
            json_format.ParseDict({key: value}, message, ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, TypeError, RecursionError):
            continue
    return bytes(message.SerializeToString())


def _mutate(rng: random.Random, original: bytes) -> bytes:
    data = bytearray(original)
    for _ in range(rng.randrange(1, 6)):
        roll = rng.random()
        if roll < 0.3 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif roll < 0.5 and data:
            del data[rng.randrange(len(data)) :]
        elif roll < 0.7:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randrange(1, 16))
        else:
            data += rng.choice([b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\x80" * 11])
    return bytes(data)


def _crafted_proto(rng: random.Random) -> bytes:
    """Wire-level oddities: lying lengths, wrong wire types, groups, deep nesting."""
    return rng.choice(
        [
            b"\x0a\xff\xff\xff\xff\x07abc",  # a string field claiming 2 GiB
            b"\x0d\x00\x00",  # fixed32 cut short
            b"\x0b" * 2000 + b"\x0c" * 2000,  # start-group 2000 deep
            b"\x1a\x02" * 200,  # nested length-delimited fields
            b"\x08" + b"\xff" * 20,  # a varint of 20 bytes
            b"\x0f\x01",  # wire type 7
            b"\x00\x01",  # field number 0
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
        ]
    )


@functools.cache
def _huge_json(mib: int) -> bytes:
    return json.dumps({"x": "y" * (mib << 20)}).encode()


@functools.cache
def _bomb(mib: int) -> bytes:
    return gzip.compress(bytes(mib << 20), compresslevel=9)


def envelope(flags: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BI", flags, len(payload) if length is None else length) + payload


# -- requests -------------------------------------------------------------------------------


class Generator:
    """Seeded: the same seed and ids give the same requests."""

    def __init__(self, seed: int, key: str, ids: Ids) -> None:
        self.rng = random.Random(seed)
        self.key = key
        self.ids = ids
        self.values = Values(self.rng, ids)
        self.targets = targets()

    def _auth(self) -> list[tuple[bytes, bytes]]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.7:
            return [(b"authorization", f"Bearer {self.key}".encode())]
        choice = rng.choice(
            [
                b"",
                b"Bearer",
                b"Bearer crl_" + b"x" * 32,
                b"Basic dXNlcjpwYXNz",
                b"bearer " + self.key.encode(),
                b"Bearer " + self.key.encode() + b"\xff",
                b"Bearer " + b"k" * 4000,
                None,
            ]
        )
        return [] if choice is None else [(b"authorization", choice)]

    def _extra_headers(self) -> list[tuple[bytes, bytes]]:
        rng = self.rng
        if rng.random() > 0.15:
            return []
        return [
            rng.choice(
                [
                    (b"connect-protocol-version", b"2"),
                    (b"connect-protocol-version", b"1"),
                    (
                        b"connect-timeout-ms",
                        rng.choice([b"-5", b"abc", b"0", b"99999999999", b"1"]),
                    ),
                    (b"grpc-timeout", rng.choice([b"1S", b"abc", b"1X", b"S", b"999999999H"])),
                    (b"accept-encoding", rng.choice([b"gzip", b"br, zstd", b"\xff"])),
                    (b"connect-accept-encoding", b"gzip"),
                    (b"x-odd", b"\xff\xfe"),
                ]
            )
        ]

    def _message(self, target: Target) -> dict[str, Any]:
        data = self.values.message(target.input)
        if target.name == "SandboxService/Exec" and data.get("stdin") is True:
            # A command reading a stdin no one writes to waits for ever: a hang of the
            # fuzzer's own making, not the server's.
            data.pop("argv", None)
            data["cmd"] = self.rng.choice(HARMLESS_COMMANDS)
        if target.name == "SandboxService/StreamEvents" and data.get("follow"):
            # Following the fuzzer's own live sandbox's events lasts as long as it does.
            data["follow"] = False
        return data

    def _payload(self, target: Target, codec: str) -> tuple[str, bytes]:
        """(what, encoded message) in `codec` ("json" or "proto")."""
        rng = self.rng
        roll = rng.random()
        if codec == "json":
            if roll < 0.75:
                return "json", json.dumps(self._message(target)).encode()
            if roll < 0.76:  # 1 MiB, and one over the 8 MiB message limit
                return "json-huge", _huge_json(rng.choice([1, 9]))
            return rng.choice(
                [
                    ("json-deep", _deep_json(rng.choice([50, 1000, 100_000]))),
                    ("json-broken", b'{"sandboxId": "'),
                    ("json-not-object", rng.choice([b"[]", b"null", b"1", b'"s"', b""])),
                    ("json-bad-utf8", b'{"path": "\xff\xfe"}'),
                    ("json-dup-keys", b'{"sandboxId": "a", "sandboxId": 1}'),
                    ("json-garbage", rng.randbytes(rng.randrange(1, 200))),
                ]
            )
        valid = _as_proto(target.input, self._message(target))
        if roll < 0.5:
            return "proto", valid
        if roll < 0.8:
            return "proto-mutated", _mutate(rng, valid)
        return "proto-crafted", _crafted_proto(rng)

    def _compress(self, body: bytes) -> tuple[str, bytes, bytes | None]:
        """(what, body, encoding header value or None)."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.8:
            return "", body, None
        return rng.choice(
            [
                ("gzip", gzip.compress(body), b"gzip"),
                ("gzip-corrupt", _mutate(rng, gzip.compress(body)), b"gzip"),
                ("gzip-bomb", _bomb(rng.choice([1, 20])), b"gzip"),
                ("gzip-not-gzip", body, b"gzip"),
                ("identity", body, b"identity"),
                ("unknown-encoding", body, rng.choice([b"br", b"zstd", b"deflate", b"x"])),
                ("list-encoding", gzip.compress(body), b"gzip, br"),
                ("gzip-uppercase", gzip.compress(body), b"GZIP"),
            ]
        )

    def next(self) -> Request:
        rng = self.rng
        target = rng.choice(self.targets)
        headers = self._auth() + self._extra_headers()
        roll = rng.random()
        if roll < 0.05:
            return self._odd_method(target, headers)
        if roll < 0.1 and not target.client_streaming and not target.server_streaming:
            return self._get(target, headers)
        streamed = target.client_streaming or target.server_streaming
        if streamed or rng.random() < 0.1:
            return self._stream(target, headers)
        return self._unary(target, headers)

    def _content_type(self, default: bytes) -> tuple[str, bytes | None]:
        rng = self.rng
        if rng.random() > 0.1:
            return "", default
        return "content-type", rng.choice(
            [
                None,
                b"text/plain",
                b"application/xml",
                b"application/json; charset=latin-1",
                b"application/json; charset=utf-8",
                b"application/connect+xml",
                b"application/grpc",
                b"application/grpc+json",
                b"application/grpc-web+xml",
                b"APPLICATION/JSON",
                b"application/\xff",
                b"",
            ]
        )

    def _unary(self, target: Target, headers: list[tuple[bytes, bytes]]) -> Request:
        codec = self.rng.choice(["json", "json", "proto"])
        what, body = self._payload(target, codec)
        odd, content_type = self._content_type(f"application/{codec}".encode())
        compressed, body, encoding = self._compress(body)
        if content_type is not None:
            headers = [*headers, (b"content-type", content_type)]
        if encoding is not None:
            headers = [*headers, (b"content-encoding", encoding)]
        kind = "+".join(k for k in ("unary", what, odd, compressed) if k)
        return Request(kind, target.name, "POST", target.path, headers, body)

    def _stream(self, target: Target, headers: list[tuple[bytes, bytes]]) -> Request:
        rng = self.rng
        codec = rng.choice(["json", "proto"])
        protocol = rng.choice(["connect", "connect", "grpc-web"])
        default = (
            f"application/connect+{codec}"
            if protocol == "connect"
            else ("application/grpc-web+json" if codec == "json" else "application/grpc-web")
        ).encode()
        odd, content_type = self._content_type(default)
        count = rng.choice([1, 1, 1, 2, 3, 0]) if target.client_streaming else 1
        if not target.client_streaming and rng.random() < 0.05:
            count = rng.choice([0, 2])
        parts, kinds = [], [f"stream-{protocol}"]
        encoding_header = b"connect-content-encoding" if protocol == "connect" else b"grpc-encoding"
        encoding: bytes | None = None
        if rng.random() < 0.15:
            encoding = rng.choice([b"gzip", b"gzip", b"br", b"identity", b"bogus"])
            kinds.append(f"encoding-{encoding.decode()}")
        for _ in range(count):
            what, payload = self._payload(target, codec)
            kinds.append(what)
            flags = 0
            if encoding == b"gzip" and rng.random() < 0.8:
                payload = gzip.compress(payload) if rng.random() < 0.8 else _mutate(rng, payload)
                flags = 1
            length: int | None = None
            roll = rng.random()
            if roll < 0.05:
                flags = rng.choice([1, 2, 0x80, 0xFF, 3])  # lying flags
                kinds.append(f"flags-{flags}")
            elif roll < 0.1:
                length = rng.choice([0, len(payload) + 1, max(len(payload) - 1, 0), 0xFFFFFFFF])
                kinds.append("lying-length")
            parts.append(envelope(flags, payload, length))
        body = b"".join(parts)
        if rng.random() < 0.05 and body:
            body = body[: rng.randrange(len(body))]
            kinds.append("truncated")
        headers = list(headers)
        if content_type is not None:
            headers.append((b"content-type", content_type))
        if encoding is not None:
            headers.append((encoding_header, encoding))
        kinds.append(odd)
        return Request(
            "+".join(k for k in kinds if k), target.name, "POST", target.path, headers, body
        )

    def _get(self, target: Target, headers: list[tuple[bytes, bytes]]) -> Request:
        rng = self.rng
        what, payload = self._payload(target, "json")
        params = {"encoding": rng.choice(["json", "proto", "xml", ""]), "connect": "v1"}
        if rng.random() < 0.3:
            payload = gzip.compress(payload) if rng.random() < 0.7 else b"not gzip"
            params["compression"] = rng.choice(["gzip", "gzip", "br"])
        if rng.random() < 0.5 or "compression" in params:
            params["base64"] = "1"
            params["message"] = base64.urlsafe_b64encode(payload).decode().rstrip("=")
            if rng.random() < 0.1:
                params["message"] = "!!not base64!!"
        else:
            params["message"] = payload.decode("utf-8", "replace")
        if rng.random() < 0.1:
            del params["message"]
        query = urllib.parse.urlencode(params)[:60_000]
        return Request(f"get+{what}", target.name, "GET", target.path, headers, b"", query)

    def _odd_method(self, target: Target, headers: list[tuple[bytes, bytes]]) -> Request:
        method = self.rng.choice(["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "GET"])
        path = target.path if self.rng.random() < 0.8 else target.path + "/extra"
        headers = [*headers, (b"content-type", b"application/json")]
        return Request(f"method-{method}", target.name, method, path, headers, b"{}")


# -- answers --------------------------------------------------------------------------------


def answer_code(response: httpx.Response) -> str:
    """The Connect code of an answer: "ok", a code name, or "http-<status>"."""
    content_type = response.headers.get("content-type", "")
    data = response.content
    if content_type.startswith("application/grpc-web"):
        status = None
        while len(data) >= 5:
            flags, length = struct.unpack(">BI", data[:5])
            frame, data = data[5 : 5 + length], data[5 + length :]
            if flags & 0x80:
                for line in frame.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "grpc-status":
                        status = int(value.strip())
        if status is None:
            status = int(response.headers.get("grpc-status", "-1"))
        return GRPC_CODES[status] if 0 <= status < len(GRPC_CODES) else f"grpc-{status}"
    if content_type.startswith("application/connect+"):
        end: dict[str, Any] = {}
        while len(data) >= 5:
            flags, length = struct.unpack(">BI", data[:5])
            frame, data = data[5 : 5 + length], data[5 + length :]
            if flags & 0x02:
                end = json.loads(gzip.decompress(frame) if flags & 0x01 else frame)
        error = end.get("error")
        return str(error.get("code", "unknown")) if error else "ok"
    if response.status_code == 200:
        return "ok"
    if content_type.startswith("application/json"):
        try:
            body = response.json()
        except ValueError:
            return f"http-{response.status_code}"
        if isinstance(body, dict) and "code" in body:
            return str(body["code"])
    return f"http-{response.status_code}"


@dataclass
class Failure:
    kind: str
    target: str
    outcome: str
    detail: str


@dataclass
class Report:
    requests: int = 0
    server_errors: int = 0  # HTTP 500, internal/unknown/data_loss, dropped connections
    http_5xx: int = 0  # every 5xx, the protocol's 501 (unimplemented) and 503 included
    hangs: int = 0
    seconds: float = 0.0
    codes: Counter[str] = field(default_factory=Counter)
    codes_5xx: Counter[str] = field(default_factory=Counter)  # the codes of the 5xx answers
    failures: list[Failure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "server_errors": self.server_errors,
            "http_5xx": self.http_5xx,
            "hangs": self.hangs,
            "seconds": round(self.seconds, 1),
            "codes": dict(self.codes.most_common()),
            "codes_of_5xx": dict(self.codes_5xx.most_common()),
            "failures": [vars(f) for f in self.failures[:50]],
        }


def send(client: httpx.Client, url: str, request: Request, report: Report) -> None:
    """Send one request and count its outcome."""
    report.requests += 1
    target = url + request.path + (f"?{request.query}" if request.query else "")
    try:
        response = client.request(
            request.method, target, headers=request.headers, content=request.body
        )
    except httpx.TimeoutException:
        report.hangs += 1
        report.codes["hang"] += 1
        report.failures.append(Failure(request.kind, request.target, "hang", ""))
        return
    except httpx.TransportError as exc:
        report.server_errors += 1
        report.codes["dropped"] += 1
        report.failures.append(Failure(request.kind, request.target, "dropped", repr(exc)))
        return
    code = answer_code(response)
    report.codes[code] += 1
    if response.status_code >= 500:
        report.http_5xx += 1
        report.codes_5xx[code] += 1
    if code in SERVER_ERROR_CODES or response.status_code == 500:
        report.server_errors += 1
        detail = response.content[:300].decode("utf-8", "replace")
        report.failures.append(Failure(request.kind, request.target, code, detail))


def run(
    url: str,
    key: str,
    ids: Ids,
    *,
    seed: int,
    count: int,
    seconds: float,
    timeout: float = 20.0,
    between: Callable[[], None] | None = None,
) -> Report:
    """Send up to `count` requests in at most `seconds`; `between` runs every 100."""
    generator = Generator(seed, key, ids)
    report = Report()
    started = time.monotonic()
    with httpx.Client(timeout=timeout) as client:
        while report.requests < count and time.monotonic() - started < seconds:
            send(client, url, generator.next(), report)
            if between is not None and report.requests % 100 == 0:
                between()
    report.seconds = time.monotonic() - started
    return report


# -- the fuzzer's own sandbox and job ------------------------------------------------------


class Playground:
    """A sandbox and a finished job of the fuzzer's key, kept usable between batches."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.ids = Ids()
        self.notes: list[str] = []  # what went wrong keeping the sandbox usable
        self._client = httpx.Client(
            timeout=60,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        self.ids.job = self._call("JobService", "Submit", {"spec": {"command": ["true"]}})["job"][
            "id"
        ]
        self.refresh()

    def _call(self, service: str, method: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._client.post(f"{self.url}/corral.v1.{service}/{method}", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{service}/{method} {body}: {response.text}")
        answer: dict[str, Any] = response.json()
        return answer

    def refresh(self) -> None:
        """Resume the sandbox if the fuzzing paused it; a new one if it killed it."""
        try:
            got = self._call("SandboxService", "Get", {"sandboxId": self.ids.sandbox})
            state = str(got["sandbox"]["state"])
        except RuntimeError:
            state = "gone"
        if state == "SANDBOX_STATE_PAUSED":
            try:
                self._call("SandboxService", "Resume", {"sandboxId": self.ids.sandbox})
                return
            except RuntimeError as exc:  # noted for the report; fuzzing goes on in a new one
                self.notes.append(str(exc)[:300])
        if state != "SANDBOX_STATE_RUNNING":
            create = {"timeoutSeconds": 3600, "isolation": "namespace"}
            try:
                created = self._call("SandboxService", "Create", create)
            except RuntimeError as exc:  # the fuzzed Creates filled the team's quota
                self.notes.append(str(exc)[:300])
                self.kill_all()
                created = self._call("SandboxService", "Create", create)
            self.ids.sandbox = created["sandbox"]["id"]

    def broken(self) -> str:
        """Why the sandbox no longer runs a command (its guest agent died …), or ""."""
        answer = b""
        for _ in range(3):
            self.refresh()
            payload = json.dumps({"sandboxId": self.ids.sandbox, "cmd": "echo ok"}).encode()
            answer = self._client.post(
                f"{self.url}/corral.v1.SandboxService/Exec",
                content=envelope(0, payload),
                headers={"Content-Type": "application/connect+json"},
            ).content
            if b"b2sK" in answer:  # "ok\n", base64
                return ""
            if b"failed_precondition" not in answer:
                break
            # Killed or paused since `refresh` looked (a fuzzed SetTimeout of 1 s, say).
            time.sleep(0.5)
        return f"{self.ids.sandbox}: {answer[:500]!r}"

    def kill_all(self) -> None:
        listed = self._call("SandboxService", "List", {"pageSize": 1000})
        for sandbox in listed.get("sandboxes", []):
            self._client.post(
                f"{self.url}/corral.v1.SandboxService/Kill", json={"sandboxId": sandbox["id"]}
            )

    def close(self) -> None:
        """Kill every sandbox of the key and cancel its jobs: the fuzzing made some."""
        self.kill_all()
        jobs = self._call("JobService", "List", {"pageSize": 1000})
        for job in jobs.get("jobs", []):
            self._client.post(f"{self.url}/corral.v1.JobService/Cancel", json={"jobId": job["id"]})
        self._client.close()


@dataclass
class Fuzzed:
    """What `fuzz_server` found, and whether its sandbox survived."""

    report: Report
    broken: str  # why the fuzzer's sandbox no longer runs a command, or ""
    notes: list[str]  # what went wrong keeping that sandbox usable


def fuzz_server(
    url: str, key: str, *, seed: int, count: int, seconds: float, timeout: float = 20.0
) -> Fuzzed:
    """`run` against the server at `url` with a `Playground` of its own (closed at the end,
    whatever happens): the short run of the tests and the long one of the benchmark."""
    playground = Playground(url, key)
    try:
        report = run(
            url,
            key,
            playground.ids,
            seed=seed,
            count=count,
            seconds=seconds,
            timeout=timeout,
            between=playground.refresh,
        )
        return Fuzzed(report, playground.broken(), playground.notes)
    finally:
        playground.close()
