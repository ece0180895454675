"""The port proxy's routing, pure logic: which sandbox port a request names, with what
token, and what goes on to the sandbox's server (the live proxy: tests/test_ports.py)."""

from __future__ import annotations

from typing import Any

import pytest

from corral.client._models import Limits, SandboxInfo
from corral.client._ports import port_host, port_url
from corral.config import Settings
from corral.errors import (
    Forbidden,
    InvalidRequest,
    IsolationUnavailable,
    NotFound,
    PortClosed,
    SandboxNotRunning,
    Unauthenticated,
)
from corral.server.ports import error_body, forwarded_headers, parse_host, route


@pytest.mark.parametrize(
    ("host", "domain", "expected"),
    [
        ("8000-sb_abc.localhost:7878", "localhost", ("8000", "sb_abc")),
        ("8000-SB_ABC.LocalHost", "localhost", ("8000", "sb_abc")),
        ("49983-sb_abc.sbx.example.com", "sbx.example.com", ("49983", "sb_abc")),
        ("99999-sb_abc.localhost", "localhost", ("99999", "sb_abc")),  # refused as a port
        ("corral-dev.localhost:7878", "localhost", None),  # the API by another name
        ("-1-sb_abc.localhost", "localhost", None),
        ("localhost:7878", "localhost", None),  # the API itself
        ("api.localhost", "localhost", None),
        ("8000-sb_abc.evil.localhost", "localhost", None),
        ("8000-sb_abc.localhost.evil.com", "localhost", None),
        ("8000-sb_abc.localhost", "example.com", None),
        ("[::1]:7878", "localhost", None),
        ("", "localhost", None),
    ],
)
def test_parse_host(host: str, domain: str, expected: tuple[str, str] | None) -> None:
    assert parse_host(host, domain) == expected


def scope(path: bytes, query: bytes = b"", **headers: str) -> dict[str, Any]:
    return {
        "path": path.decode(),
        "raw_path": path,
        "query_string": query,
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        "client": ("192.0.2.7", 50000),
        "scheme": "http",
    }


def test_the_path_form_strips_its_prefix_and_the_token_only() -> None:
    found = route(
        scope(b"/sandboxes/sb_1/ports/8000/a/b%20c", b"x=1&corral_token=t%2Bk&y=%26"),
        "localhost",
    )
    assert found is not None
    assert (found.sandbox_id, found.port, found.token) == ("sb_1", 8000, "t+k")
    assert found.target == b"/a/b%20c?x=1&y=%26"
    assert found.prefix == b"/sandboxes/sb_1/ports/8000"
    bare = route(scope(b"/sandboxes/sb_1/ports/8000"), "localhost")
    assert bare is not None and bare.target == b"/" and bare.token is None


def test_the_host_form_keeps_the_path_and_a_header_token_wins() -> None:
    found = route(
        scope(
            b"/sandboxes/sb_other/ports/1/",
            b"corral_token=q",
            host="9000-sb_2.localhost:7878",
            x_corral_traffic_token="h",
        ),
        "localhost",
    )
    assert found is not None
    assert (found.sandbox_id, found.port, found.token) == ("sb_2", 9000, "h")
    assert found.target == b"/sandboxes/sb_other/ports/1/" and found.prefix == b""


def test_requests_for_the_api_are_not_routed() -> None:
    paths = (
        b"/healthz",
        b"/corral.v1.SandboxService/Get",
        b"/sandboxes",
        # E2B's REST API shares the prefix: only /sandboxes/<id>/ports/ is the proxy's.
        b"/sandboxes/sb_1",
        b"/sandboxes/sb_1/timeout",
        b"/sandboxes/sb_1/port/80/",
    )
    for path in paths:
        assert route(scope(path, host="127.0.0.1:7878"), "localhost") is None
    # E2B's envd port in the host form is the server's own envd, never proxied.
    assert route(scope(b"/health", host="49983-sb_1.localhost:7878"), "localhost") is None


@pytest.mark.parametrize(
    "path",
    [
        b"/sandboxes/sb_1/ports/0/",
        b"/sandboxes/sb_1/ports/65536/",
        b"/sandboxes/sb_1/ports/%38%30/",
        b"/sandboxes/sb_1/ports/\xd9\xa1/",  # a digit, but not an ASCII one
        b"/sandboxes//ports/80/",
        b"/sandboxes/sb_1/ports//",
    ],
)
def test_malformed_port_urls_are_refused(path: bytes) -> None:
    with pytest.raises(InvalidRequest):
        route(scope(path), "localhost")


@pytest.mark.parametrize(
    "path", [b"/sandboxes/sb_1/snapshots", b"/sandboxes/sb_1/metrics", b"/sandboxes/sb_1/port/80/"]
)
def test_other_sandbox_paths_are_left_to_the_api(path: bytes) -> None:
    """E2B's REST API has routes under /sandboxes/<id>/ too: only `ports/` is the proxy's."""
    assert route(scope(path), "localhost") is None


def test_forwarded_headers_drop_the_token_hop_by_hop_and_spoofed_forwarding() -> None:
    request = scope(
        b"/sandboxes/sb_1/ports/80/",
        host="127.0.0.1:7878",
        connection="keep-alive, x-secret",
        x_secret="hop",
        keep_alive="5",
        transfer_encoding="chunked",
        te="trailers",
        upgrade="h2c",
        x_corral_traffic_token="t",
        e2b_traffic_access_token="t",
        x_forwarded_for="10.0.0.1",
        cookie="a=1",
    )
    found = route(request, "localhost")
    assert found is not None
    headers = dict(forwarded_headers(request, found, upgrade=False))
    assert headers == {
        b"host": b"127.0.0.1:7878",
        b"cookie": b"a=1",
        b"x-forwarded-for": b"192.0.2.7",
        b"x-forwarded-proto": b"http",
        b"x-forwarded-host": b"127.0.0.1:7878",
        b"x-forwarded-prefix": b"/sandboxes/sb_1/ports/80",
    }
    upgrade = scope(
        b"/sandboxes/sb_1/ports/80/", host="h", connection="Upgrade", upgrade="websocket"
    )
    found = route(upgrade, "localhost")
    assert found is not None
    kept = dict(forwarded_headers(upgrade, found, upgrade=True))
    assert kept[b"connection"] == b"Upgrade" and kept[b"upgrade"] == b"websocket"


def test_refusals_have_their_statuses() -> None:
    cases = [
        (InvalidRequest("x"), 400),
        (Unauthenticated("x"), 401),
        (Forbidden("x"), 403),
        (NotFound("x"), 404),
        (SandboxNotRunning("x"), 409),
        (IsolationUnavailable("x"), 501),
        (PortClosed("x"), 502),
    ]
    for exc, status in cases:
        assert error_body(exc)[0] == status


def info(token: str = "tok/en", domain: str = "localhost") -> SandboxInfo:
    return SandboxInfo(
        "sb_1", "host", "namespace", "running", "", {}, Limits(), None, None, 0, "pause",
        None, traffic_token=token, ports_domain=domain,
    )  # fmt: skip


def test_sdk_urls() -> None:
    assert port_host(info(), "http://127.0.0.1:7878", 8000) == "8000-sb_1.localhost:7878"
    assert port_host(info(domain="s.example.com"), "https://corral.example.com", 80) == (
        "80-sb_1.s.example.com"
    )
    server = "http://127.0.0.1:7878"
    assert port_url(info(), server, 8000) == (
        "http://127.0.0.1:7878/sandboxes/sb_1/ports/8000/?corral_token=tok%2Fen"
    )
    assert port_url(info(token=""), server, 8000, "/a?b=1", host_form=True) == (
        "http://8000-sb_1.localhost:7878/a?b=1"
    )
    assert port_url(info(), server, 8000, "/a?b=1").endswith("/a?b=1&corral_token=tok%2Fen")
    for bad in (0, 65536, "80", True):
        with pytest.raises(InvalidRequest, match="not a TCP port"):
            port_url(info(), server, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="start with '/'"):
        port_url(info(), server, 80, "a")


def test_the_ports_domain_is_checked() -> None:
    Settings.from_env({"CORRAL_PORTS_DOMAIN": "sandboxes.example.com"})
    for bad in ("", ".", "example.com:8080", "exa mple.com", "a/b"):
        with pytest.raises(InvalidRequest, match="CORRAL_PORTS_DOMAIN"):
            Settings.from_env({"CORRAL_PORTS_DOMAIN": bad})
