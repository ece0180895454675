"""E2B's envd, for every sandbox at one URL: resolve the call (`call.resolve`), then hand
the request to the service that answers it.

    /process.Process/*        process.ProcessHandlers   (generated ProcessASGIApplication)
    /filesystem.Filesystem/*  filesystem.FilesystemHandlers
    /files                    files.serve(call, scope, receive, send)
    /health                   204 while the sandbox runs (502 otherwise, like every route)
    /envs                     the sandbox's environment variables, as JSON

Refusals before the hand-over are E2B's edge's: `{"code": <status>, "message": …}`, 502
for a sandbox that is not running (the SDK says "sandbox timeout"), 401 for a missing
access token. The SDK maps such plain errors on Connect routes too. Any other failure
before the response starts is logged with its traceback and answered as JSON 500, never
as uvicorn's plain-text one.

The process and filesystem services and `/files` are separate modules that register by
existing: each is imported on first use, and answered 501 while it is missing (so the app
runs whichever parts are built). A module's own import errors are not hidden.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError
from corral.server import disconnect
from corral.server.compression import BoundedGzip, inflate
from corral.server.disconnect import Receive
from corral.server.e2b.broken import breakable
from corral.server.e2b.call import EnvdCall, resolve, set_current
from corral.server.e2b.errors import E2bError, as_envd, rest_status
from corral.server.e2b.rest import error_body, send_json
from corral.server.e2b.routing import sandbox_of
from corral.server.interceptors import ErrorInterceptor
from corral.server.ratelimit import StreamLimitInterceptor, retry_headers
from corral.server.requests import CODECS, MAX_MESSAGE_BYTES, limit_size

if TYPE_CHECKING:
    from corral.server.base import Services

log = logging.getLogger("corral.server.e2b")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_PROCESS = "/process.Process/"
_FILESYSTEM = "/filesystem.Filesystem/"
# (handlers module, handlers class, generated module, generated ASGI application class)
_SERVICES = {
    _PROCESS: (
        "corral.server.e2b.process",
        "ProcessHandlers",
        "corral.envd.process_connect",
        "ProcessASGIApplication",
    ),
    _FILESYSTEM: (
        "corral.server.e2b.filesystem",
        "FilesystemHandlers",
        "corral.envd.filesystem_connect",
        "FilesystemASGIApplication",
    ),
}


def optional(module: str, name: str) -> Any:
    """`module.name`, or None when `module` itself does not exist (yet)."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None
        raise


def _service_app(services: Services, prefix: str) -> ASGIApp | None:
    handlers_module, handlers_name, app_module, app_name = _SERVICES[prefix]
    handlers = optional(handlers_module, handlers_name)
    application = optional(app_module, app_name)
    if handlers is None or application is None:
        return None
    app: ASGIApp = application(
        handlers(services),
        # The stream limit counts callers that sent an API key (X-API-KEY); a sandbox's
        # access token is not a key.
        interceptors=[ErrorInterceptor(as_envd), StreamLimitInterceptor(services.limits)],
        read_max_bytes=MAX_MESSAGE_BYTES,
        compressions=[BoundedGzip(MAX_MESSAGE_BYTES)],
        codecs=CODECS,
    )
    return breakable(app)  # a stream whose sandbox dies breaks as a transport failure


class EnvdApp:
    """Answers envd requests of every sandbox."""

    def __init__(self, services: Services, domain: str) -> None:
        self.services = services
        self.domain = domain  # of E2B's host form `49983-<id>.<domain>`
        self._apps: dict[str, ASGIApp | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        started = False

        @functools.wraps(send)  # `broken` unwraps it to reach uvicorn's connection
        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._answer(scope, receive, tracked, path)
        except Exception:
            if started:  # too late for an answer: uvicorn logs it and drops the connection
                raise
            log.exception("envd request failed", extra={"path": path})
            await send_json(
                send,
                500,
                error_body(500, "internal error in the Corral server; its log has details"),
            )

    async def _answer(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        try:
            call = self._call(scope)
            self.services.limits.take_caller()  # when it came with an API key
            set_current(call)
            if path.startswith((_PROCESS, _FILESYSTEM)):
                await self._service(scope, receive, send, path)
            elif path == "/files":
                serve_files = optional("corral.server.e2b.files", "serve")
                if serve_files is None:
                    raise E2bError(501, "envd's /files is not built into this server yet")
                await serve_files(self.services, call, scope, disconnect.watch(receive), send)
            elif path == "/health":
                await send_json(send, 204, None)
            elif path == "/envs":
                await send_json(send, 200, self._envs(call))
            else:
                raise E2bError(404, f"envd has no route {path}")
        except CorralError as exc:
            status = rest_status(exc)
            log.debug("envd request refused", extra={"status": status, "error": str(exc)})
            await send_json(send, status, error_body(status, str(exc)), retry_headers(exc))

    def _call(self, scope: Scope) -> EnvdCall:
        headers = {
            bytes(k).decode("latin-1").lower(): bytes(v).decode("latin-1")
            for k, v in scope.get("headers", ())
        }
        sandbox_id = sandbox_of(scope, self.domain)
        if sandbox_id is None:
            if scope["path"] == "/files":
                resolve_signed = optional("corral.server.e2b.signing", "resolve_signed")
                if resolve_signed is not None:
                    signed: EnvdCall = resolve_signed(self.services, scope)
                    return signed
            raise E2bError(
                400,
                "envd requests name their sandbox with the header E2b-Sandbox-Id (the SDK "
                "sends it when E2B_SANDBOX_URL points at this server) or the host "
                f"49983-<sandbox id>.{self.domain}",
            )
        return resolve(self.services, sandbox_id, headers)

    async def _service(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        prefix = _PROCESS if path.startswith(_PROCESS) else _FILESYSTEM
        if prefix not in self._apps:
            self._apps[prefix] = _service_app(self.services, prefix)
        app = self._apps[prefix]
        if app is None:
            service = prefix.strip("/")
            raise E2bError(501, f"envd's {service} service is not built into this server yet")
        # As Corral's own services: sizes counted as they arrive, gzip bounded.
        receive = limit_size(receive, dict(scope.get("headers", ())), MAX_MESSAGE_BYTES)
        scope, receive = inflate(scope, receive, MAX_MESSAGE_BYTES)
        await app(scope, disconnect.watch(receive), send)

    def _envs(self, call: EnvdCall) -> dict[str, str]:
        manager = self.services.manager
        assert manager is not None  # resolve() checked
        return manager.envs(call.sandbox_id)
