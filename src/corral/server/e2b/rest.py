"""E2B's control-plane REST API: a small router, its request and response types, and the
one place that turns errors into E2B's `{"code": <status>, "message": …}` bodies.

Each module of routes exports `ROUTES`, a list of `Route(method, pattern, handler)`;
a pattern's `{name}` segments become `RestRequest.params`. A handler is

    async def handler(services: Services, req: RestRequest) -> RestResponse

and raises `E2bError(status, message)` or any CorralError to refuse (mapped by
`errors.rest_status`). The caller is authenticated (header `X-API-KEY`, or
`Authorization: Bearer`) before the body is read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from corral.errors import CorralError, ServerUnavailable
from corral.server.auth import authenticate_e2b
from corral.server.disconnect import Receive
from corral.server.e2b.errors import E2bError, rest_status
from corral.server.ratelimit import retry_headers
from corral.server.tracing import name_route

if TYPE_CHECKING:
    from corral.server.base import Services
    from corral.store import Team

log = logging.getLogger("corral.server.e2b")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# A REST body is a few fields (a template build's steps at most): 8 MiB is plenty.
MAX_BODY_BYTES = 8 * 1024 * 1024
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class RestRequest:
    team: Team
    method: str
    params: dict[str, str]  # from the route's pattern
    query: list[tuple[str, str]]  # in order, repeats kept
    body: Any  # parsed JSON, or None for an empty body
    headers: dict[str, str]  # names in lower case
    # How the client reached this server: "https" when it serves TLS itself (`corral
    # server --tls-…`) or a proxy in front says so (X-Forwarded-Proto), else "http".
    scheme: str = "http"

    def arg(self, name: str) -> str | None:
        """The last value of query parameter `name`, or None."""
        values = [value for key, value in self.query if key == name]
        return values[-1] if values else None

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object ({} when there is none)."""
        if self.body is None:
            return {}
        if not isinstance(self.body, dict):
            raise E2bError(400, "the request body must be a JSON object")
        return self.body


@dataclass(frozen=True)
class RestResponse:
    status: int
    body: Any = None  # JSON-serialisable; None sends no body
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[["Services", RestRequest], Awaitable[RestResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str  # "/sandboxes/{sandboxID}/timeout"
    handler: Handler
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex = "".join(
            f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
            for i, part in enumerate(_PARAM.split(self.pattern))
        )
        object.__setattr__(self, "_regex", re.compile(regex))

    def match(self, path: str) -> dict[str, str] | None:
        """The pattern's parameters if `path` matches it (one segment each), else None."""
        found = self._regex.fullmatch(path)
        return found.groupdict() if found else None


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"code": status, "message": message}


async def send_json(
    send: Send, status: int, body: Any, headers: dict[str, str] | None = None
) -> None:
    """An HTTP response with a JSON body (none for None or a 204)."""
    raw = b"" if body is None or status == 204 else json.dumps(body).encode()
    head = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    if raw:
        head.append((b"content-type", b"application/json"))
    head.append((b"content-length", str(len(raw)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": raw})


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole request body, refused past `limit` bytes as it arrives."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise E2bError(400, "the client disconnected before sending its whole body")
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise E2bError(413, f"request body over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class RestApp:
    """Answers E2B REST requests with the routes given."""

    def __init__(self, services: Services, routes: Sequence[Route]) -> None:
        self.services = services
        self.routes = list(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self._answer(scope, receive)
        except CorralError as exc:
            status = rest_status(exc)
            level = logging.WARNING if status >= 500 else logging.DEBUG
            log.log(level, "e2b request refused", extra={"status": status, "error": str(exc)})
            response = RestResponse(status, error_body(status, str(exc)), retry_headers(exc))
        except Exception:
            log.exception("e2b request failed")
            response = RestResponse(
                500, error_body(500, "internal error in the Corral server; its log has details")
            )
        await send_json(send, response.status, response.body, response.headers)

    async def _answer(self, scope: Scope, receive: Receive) -> RestResponse:
        store = self.services.store
        if store is None:
            raise ServerUnavailable("the Corral server is starting or stopping; try again")
        path: str = scope["path"].rstrip("/") or "/"
        method: str = scope["method"]
        route, params = self._route(method, path)  # the routes are public: before the key
        name_route(method, route.pattern)
        headers = {
            bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
            for k, v in scope.get("headers", ())
        }
        team = authenticate_e2b(
            self.services, headers.get("x-api-key"), headers.get("authorization", "")
        )
        self.services.limits.take_caller()
        raw = await read_body(receive)
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError as exc:
            raise E2bError(400, f"the request body is not valid JSON: {exc}") from None
        query = parse_qsl(bytes(scope.get("query_string", b"")).decode("latin-1"), True)
        secure = scope.get("scheme") == "https" or headers.get("x-forwarded-proto") == "https"
        req = RestRequest(team, method, params, query, body, headers, "https" if secure else "http")
        return await route.handler(self.services, req)

    def _route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.append(route.method)
        if allowed:
            raise E2bError(405, f"{method} {path} is not allowed; use {', '.join(allowed)}")
        hint = ""
        if path.startswith("/sandboxes/"):
            hint = " (a sandbox port's URL is /sandboxes/<sandbox id>/ports/<port>/<path>)"
        raise E2bError(404, f"no E2B endpoint {method} {path}{hint}")
