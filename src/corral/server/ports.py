"""The port proxy's routing: which sandbox port a request is for, with what credential,
what it forwards, and how it refuses.

    http://8000-<sandbox id>.<ports_domain>[:server port]/any/path     E2B's host form
    http://<server>/sandboxes/<sandbox id>/ports/8000/any/path          path form

In the path form the prefix is stripped: the sandbox's server sees `/any/path` (and the
prefix in `X-Forwarded-Prefix`). The credential is the sandbox's traffic access token, not
an API key (a browser opens these URLs): the header `X-Corral-Traffic-Token` or
`e2b-traffic-access-token`, or the query parameter `corral_token`, each removed before
the request goes on; a sandbox created with public ports needs none.

HTTP requests are relayed by `corral.server.port_http`, WebSocket upgrades by
`corral.server.port_websocket`, both routed and refused here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from corral import errors
from corral._wire import code_for
from corral.errors import CorralError, InvalidRequest

Scope = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

TOKEN_HEADERS = (b"x-corral-traffic-token", b"e2b-traffic-access-token")
# The port E2B's SDK reaches a sandbox's envd at (`49983-<id>.<domain>`): the server
# answers for envd itself (corral.server.e2b), so that host is never proxied.
ENVD_PORT = "49983"
TOKEN_PARAM = b"corral_token"
_PATH_PREFIX = b"/sandboxes/"
# Headers of one hop only (RFC 9110 7.6.1), never forwarded; nor are those `Connection`
# names. `Host` goes on unchanged: the sandbox's app may build links from it.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# The proxy's statuses: its own, not the API's (a closed port is a bad gateway).
_STATUS: tuple[tuple[type[CorralError], int], ...] = (
    (errors.InvalidRequest, 400),
    (errors.Unauthenticated, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.SandboxNotRunning, 409),
    (errors.PortClosed, 502),
    (errors.ServerUnavailable, 503),
    (errors.IsolationUnavailable, 501),
)


@dataclass(frozen=True)
class PortRoute:
    """Where a request goes: a port of a sandbox, and the target to send there."""

    sandbox_id: str
    port: int
    target: bytes  # path and query as the sandbox's server gets them (no token)
    prefix: bytes  # what the path form stripped ("" for the host form)
    token: str | None


def parse_host(host: str, domain: str) -> tuple[str, str] | None:
    """(port digits, sandbox id) of a Host `<port>-<sandbox id>.<domain>[:server port]`;
    None when the host names no sandbox port. The one parser of E2B's host form."""
    name = host.lower()
    if ":" in name and not name.startswith("["):  # (an IPv6 literal names no sandbox)
        name = name.rpartition(":")[0]
    suffix = "." + domain.lower().strip(".")
    if not name.endswith(suffix):
        return None
    port, dash, sandbox_id = name[: -len(suffix)].partition("-")
    # Only digits claim a host for the proxy: the API stays reachable by any other name
    # under the domain (a server called `corral-dev.localhost`, say).
    if not dash or not sandbox_id or "." in sandbox_id or not (port.isascii() and port.isdigit()):
        return None
    return port, sandbox_id


def check_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidRequest(f"port {text[:16]!r} is not a TCP port: use a number 1 to 65535")
    return int(text)


def route(scope: Scope, domain: str) -> PortRoute | None:
    """The sandbox port an HTTP or WebSocket request is for; None when it is for the API.
    InvalidRequest when it is for a port but malformed."""
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    host = next((v for k, v in scope["headers"] if k == b"host"), b"").decode("latin-1")
    by_host = parse_host(host, domain)
    prefix = b""
    if by_host is not None:
        port_text, sandbox_id = by_host
        if port_text == ENVD_PORT:
            return None
        path = raw_path
    elif raw_path.startswith(_PATH_PREFIX):
        sandbox_id_b, _, rest = raw_path[len(_PATH_PREFIX) :].partition(b"/")
        ports, _, rest = rest.partition(b"/")
        if ports != b"ports":
            return None  # the API's: E2B's /sandboxes/<id>, /sandboxes/<id>/timeout …
        port_b, slash, rest = rest.partition(b"/")
        if not sandbox_id_b or not port_b:
            raise InvalidRequest(
                "a sandbox port's URL is /sandboxes/<sandbox id>/ports/<port>/<path>"
            )
        sandbox_id, port_text = sandbox_id_b.decode("latin-1"), port_b.decode("latin-1")
        prefix = raw_path[: len(raw_path) - len(rest) - len(slash)]
        path = b"/" + rest
    else:
        return None
    port = check_port(port_text)
    token = _header_token(scope["headers"])
    kept = []
    for param in query.split(b"&") if query else ():
        name, _, value = param.partition(b"=")
        if name == TOKEN_PARAM:
            token = token or unquote_to_bytes(value.replace(b"+", b" ")).decode("latin-1")
        else:
            kept.append(param)
    target = path + (b"?" + b"&".join(kept) if kept else b"")
    return PortRoute(sandbox_id, port, target, prefix, token)


def _header_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name in TOKEN_HEADERS and value:
            return value.decode("latin-1").strip()
    return None


def forwarded_headers(scope: Scope, route: PortRoute, *, upgrade: bool) -> Headers:
    """The request's headers for the sandbox's server: no token, no hop-by-hop ones
    (except, for a WebSocket upgrade, `Connection` and `Upgrade`, which make it one),
    and `X-Forwarded-*` saying where it came from."""
    headers: Headers = scope["headers"]
    named = {b"connection"} if upgrade else set(HOP_BY_HOP)
    for name, value in headers:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    if upgrade:
        named -= {b"connection", b"upgrade"}
    named.update(TOKEN_HEADERS)
    named.update({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
    out = [(k, v) for k, v in headers if k not in named]
    client = scope.get("client")
    if client:
        out.append((b"x-forwarded-for", str(client[0]).encode()))
    secure = scope.get("scheme") in ("https", "wss")
    out.append((b"x-forwarded-proto", b"https" if secure else b"http"))
    host = next((v for k, v in headers if k == b"host"), None)
    if host is not None:
        out.append((b"x-forwarded-host", host))
    if route.prefix:
        out.append((b"x-forwarded-prefix", route.prefix))
    return out


def error_body(exc: CorralError) -> tuple[int, bytes]:
    """The status and short JSON body the proxy answers `exc` with."""
    status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 500)
    message = str(exc) if status != 500 else "the port proxy failed; see the server's log"
    body = {"code": code_for(exc) if status != 500 else "internal", "message": message}
    return status, json.dumps(body).encode()
