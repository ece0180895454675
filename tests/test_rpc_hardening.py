"""Issue 9, findings 1 and 8, as an attacker sends them: gzip bombs and corrupt compression
before authentication, and durations past what the guest agent's event loop can hold."""

from __future__ import annotations

import base64
import gzip
import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral.config import Settings
from tests.conftest import LiveServer, start_server
from tests.kit.connect import assert_serving, call, error, stream
from tests.kit.processes import proc_number

HEALTH = "/corral.v1.HealthService/Check"
SANDBOX = "/corral.v1.SandboxService/"
JOBS = "/corral.v1.JobService/"
GZIP_JSON = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
BOMB = gzip.compress(bytes(300 << 20), compresslevel=9)  # 300 MiB of zeros, ~300 KiB
HEALTH_BOMB = gzip.compress(bytes(60 << 20), compresslevel=9)  # under Health's 64 KiB


def post(server: LiveServer, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers=headers, timeout=60)


def peak_rss_mib(server: LiveServer) -> float:
    return proc_number(server.process.pid, "status", "VmHWM") / 1024


@pytest.fixture(scope="module")
def own_server(settings: Settings) -> Iterator[LiveServer]:
    """A server of this module alone, so that its peak memory is this module's doing."""
    live = start_server(settings, settings.runtime_dir / "rpc-hardening-data", pool_size=0)
    try:
        yield live
    finally:
        live.stop()


# -- finding 1: decompression bombs ---------------------------------------------------------


def test_a_gzip_bomb_costs_the_server_no_memory(own_server: LiveServer) -> None:
    """300 MiB of zeros in 300 KiB of gzip took the server from 87 to ~680 MiB."""
    before = peak_rss_mib(own_server)
    # Health needs no key: its bomb under the wire limit stops at the 64 KiB message limit.
    message = error(post(own_server, HEALTH, HEALTH_BOMB, GZIP_JSON), 429, "resource_exhausted")
    assert "65536" in message
    # the big one is over Health's wire limit before any inflating
    error(post(own_server, HEALTH, BOMB, GZIP_JSON), 429, "resource_exhausted")
    # no key: refused before the body is read
    message = error(post(own_server, SANDBOX + "List", BOMB, GZIP_JSON), 401, "unauthenticated")
    assert "Authorization: Bearer" in message
    # a valid key: inflated up to the 8 MiB message limit, not one byte further
    with_key = {**GZIP_JSON, "Authorization": f"Bearer {own_server.key}"}
    message = error(post(own_server, SANDBOX + "List", BOMB, with_key), 429, "resource_exhausted")
    assert "decompresses to more than the limit" in message
    # as a streamed message with the compressed flag, on gRPC-Web
    response = post(
        own_server,
        HEALTH,
        struct.pack(">BI", 1, len(HEALTH_BOMB)) + HEALTH_BOMB,
        {"Content-Type": "application/grpc-web+proto", "grpc-encoding": "gzip"},
    )
    assert b"grpc-status: 8" in response.content  # resource_exhausted
    growth = peak_rss_mib(own_server) - before
    assert growth < 64, f"the server's peak memory grew by {growth:.0f} MiB"
    assert_serving(own_server)


def test_gzip_within_the_limit_still_works(own_server: LiveServer) -> None:
    response = post(own_server, HEALTH, gzip.compress(b"{}"), GZIP_JSON)
    assert response.status_code == 200 and response.json()["status"] == "serving"
    with_key = {**GZIP_JSON, "Authorization": f"Bearer {own_server.key}"}
    response = post(own_server, SANDBOX + "List", gzip.compress(b'{"pageSize": 5}'), with_key)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x1f\x8b\x08\x00garbage-after-a-gzip-magic", "malformed gzip"),
        (b"not gzip at all", "malformed gzip"),
        (gzip.compress(b"{}" * 1000)[:-12], "truncated gzip"),
        (gzip.compress(b"{}") + b"trailing", "after the end of the gzip"),
    ],
    ids=["bad-deflate", "not-gzip", "truncated", "trailing-bytes"],
)
def test_corrupt_gzip_is_invalid_argument(own_server: LiveServer, body: bytes, words: str) -> None:
    """It was `unknown` (HTTP 500): gzip's own exception escaped."""
    assert words in error(post(own_server, HEALTH, body, GZIP_JSON), 400, "invalid_argument")
    with_key = {**GZIP_JSON, "Authorization": f"Bearer {own_server.key}"}
    message = error(post(own_server, SANDBOX + "List", body, with_key), 400, "invalid_argument")
    assert words in message


def test_a_compressed_flag_without_an_encoding_is_invalid_argument(own_server: LiveServer) -> None:
    """connectrpc answers `internal`: a protocol error of the client's."""
    payload = gzip.compress(json.dumps({"sandboxId": "sb_x", "path": "/etc/hostname"}).encode())
    response = post(
        own_server,
        SANDBOX + "ReadFile",
        struct.pack(">BI", 1, len(payload)) + payload,
        {
            "Content-Type": "application/connect+json",
            "Authorization": f"Bearer {own_server.key}",
        },
    )
    assert response.status_code == 200  # a stream: the error is in its end message
    end = json.loads(response.content[5:])
    assert end["error"]["code"] == "invalid_argument", end
    assert "compressed flag" in end["error"]["message"]


def test_headers_connectrpc_cannot_read_are_invalid_argument(own_server: LiveServer) -> None:
    """A header value that is not UTF-8 (connectrpc raises out of the app: a bare 500),
    and a gRPC-Web timeout that is not one (connectrpc 0.13 answers it itself)."""
    with httpx.Client(base_url=own_server.url, timeout=60) as client:
        odd = client.post(
            HEALTH,
            content=b"{}",
            headers=[(b"Content-Type", b"application/json"), (b"X-Odd", b"\xff\xfe")],
        )
        message = error(odd, 400, "invalid_argument")
        assert "the value of header 'x-odd' is not UTF-8" in message
        for timeout in ("abc", "1X", "999999999H"):
            web = client.post(
                SANDBOX + "List",
                content=struct.pack(">BI", 0, 0),
                headers={
                    "Content-Type": "application/grpc-web+proto",
                    "Authorization": f"Bearer {own_server.key}",
                    "grpc-timeout": timeout,
                },
            )
            assert web.status_code == 200  # gRPC-Web: the status is in the headers
            assert web.headers["grpc-status"] == "3", (timeout, web.headers)  # invalid_argument
            assert "timeout" in web.headers["grpc-message"]


def test_a_body_ending_inside_a_streamed_message_is_invalid_argument(
    own_server: LiveServer,
) -> None:
    payload = json.dumps({"sandboxId": "sb_x", "path": "/etc/hostname"}).encode()
    response = post(
        own_server,
        SANDBOX + "ReadFile",
        struct.pack(">BI", 0, len(payload) + 10) + payload,
        {
            "Content-Type": "application/connect+json",
            "Authorization": f"Bearer {own_server.key}",
        },
    )
    end = json.loads(response.content[5:])
    assert end["error"]["code"] == "invalid_argument", end
    assert "ends inside a streamed message" in end["error"]["message"]


def test_gzip_streams_are_inflated_message_by_message(server: LiveServer, box: str) -> None:
    """A client stream with some messages compressed and some not, on Connect and gRPC-Web."""
    for content_type, encoding in [
        ("application/connect+json", "connect-content-encoding"),
        ("application/grpc-web+json", "grpc-encoding"),
    ]:
        parts = [
            {"header": {"sandboxId": box, "path": "/tmp/gz.txt"}},
            {"data": base64.b64encode(b"compressed ").decode()},
            {"data": base64.b64encode(b"plain").decode()},
        ]
        body = b"".join(
            struct.pack(">BI", flag, len(data)) + data
            for flag, data in [
                (1, gzip.compress(json.dumps(parts[0]).encode())),
                (1, gzip.compress(json.dumps(parts[1]).encode())),
                (0, json.dumps(parts[2]).encode()),
            ]
        )
        headers = {
            "Content-Type": content_type,
            encoding: "gzip",
            "Authorization": f"Bearer {server.key}",
        }
        response = post(server, SANDBOX + "WriteFile", body, headers)
        assert response.status_code == 200 and b"gz.txt" in response.content, response.content
        messages, end = stream(server, "ReadFile", {"sandboxId": box, "path": "/tmp/gz.txt"})
        assert not end.get("error"), end
        assert b"".join(base64.b64decode(m["data"]) for m in messages) == b"compressed plain"


# -- finding 8: every duration is bounded at the API ------------------------------------------


@pytest.mark.parametrize("timeout", [30 * 86400, 1e300, "Infinity", "NaN", -2, 86400.5])
def test_an_exec_timeout_out_of_range_is_refused_and_the_sandbox_lives(
    server: LiveServer, box: str, timeout: Any
) -> None:
    """30 days overflowed the guest agent's poll() and killed it; later calls got 500s."""
    _, end = stream(server, "Exec", {"sandboxId": box, "cmd": "true", "timeoutSeconds": timeout})
    assert end["error"]["code"] == "invalid_argument", end
    assert "timeout_seconds must be positive and at most 86400" in end["error"]["message"]
    messages, end = stream(
        server, "Exec", {"sandboxId": box, "cmd": "echo alive", "timeoutSeconds": 86400}
    )
    assert not end.get("error"), end
    assert any(m.get("stdout") for m in messages)
    assert call(server, "Ping", {"sandboxId": box}).status_code == 200


def test_every_other_duration_is_bounded(server: LiveServer, box: str) -> None:
    for field in ("timeoutSeconds", "idleTimeoutSeconds"):
        message = error(call(server, "Create", {field: 2**31 - 1}), 400, "invalid_argument")
        assert "86400" in message
    message = error(
        call(server, "SetTimeout", {"sandboxId": box, "timeoutSeconds": 2**31 - 1}),
        400,
        "invalid_argument",
    )
    assert "timeout_seconds" in message and "86400" in message
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {server.key}"}
    specs: list[tuple[dict[str, Any], str]] = [
        ({"command": ["true"], "timeoutSeconds": 2**32 - 1}, "timeout"),
        ({"kind": "workflow", "steps": [{"run": "true", "timeoutSeconds": 2**32 - 1}]}, "timeout"),
        ({"command": ["true"], "retryBackoffSeconds": 1e300}, "retry_backoff"),
        ({"command": ["true"], "retryBackoffSeconds": "NaN"}, "retry_backoff"),
    ]
    for spec, field in specs:
        response = httpx.post(
            server.url + JOBS + "Submit", json={"spec": spec}, headers=headers, timeout=30
        )
        assert field in error(response, 400, "invalid_argument"), spec
    assert_serving(server)
