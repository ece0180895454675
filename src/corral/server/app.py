"""The ASGI app: Connect services for SandboxService, JobService, TemplateService and
HealthService, the standard gRPC health and reflection services (`grpc_std`),
`GET /healthz`, `GET /metrics` (`corral.server.metrics`), the port proxy to sandboxes'
ports (`corral.server.ports`), and E2B's REST API and envd (`corral.server.e2b`).

    app = create_app(Settings.from_env())     # serve it with uvicorn (`corral server`)

Routing is by path prefix (each Connect service owns `/<package.Service>/`), so no web
framework is needed; a sandbox port's host name or `/sandboxes/` path goes to the proxy
first, before any API key is asked for (the proxy checks the sandbox's traffic token).
The app's lifespan opens the store, makes sure the default team and its key exist, and
starts the sandbox manager; its shutdown stops the manager, which kills every sandbox
it ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from connectrpc.interceptor import Interceptor

from corral import __version__, logs
from corral._wire import to_connect
from corral.config import Settings
from corral.server import disconnect
from corral.server.auth import authenticate_headers
from corral.server.base import Services
from corral.server.compression import BoundedGzip, inflate
from corral.server.disconnect import Receive
from corral.server.e2b import E2bApp
from corral.server.grpc_std import (
    HEALTH_PREFIX,
    REFLECTION_PREFIXES,
    GrpcHealth,
    GrpcHealthASGIApplication,
    reflection_apps,
)
from corral.server.interceptors import ErrorInterceptor
from corral.server.jobs import JobHandlers
from corral.server.metrics import PATH as METRICS_PATH
from corral.server.metrics import MetricsEndpoint
from corral.server.port_http import PortProxy
from corral.server.ratelimit import RateLimits, StreamLimitInterceptor, retry_headers
from corral.server.requests import (
    CODECS,
    HEALTH_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    header_problem,
    limit_size,
    refuse,
)
from corral.server.service import HealthService, SandboxService
from corral.server.templates import TemplateHandlers
from corral.server.tracing import request_span
from corral.server.vms import VmHandlers
from corral.server.volumes import VolumeService
from corral.v1 import health_pb2, jobs_pb2, sandbox_pb2, templates_pb2, vms_pb2, volumes_pb2
from corral.v1.health_connect import HealthServiceASGIApplication
from corral.v1.jobs_connect import JobServiceASGIApplication
from corral.v1.sandbox_connect import SandboxServiceASGIApplication
from corral.v1.templates_connect import TemplateServiceASGIApplication
from corral.v1.vms_connect import VmServiceASGIApplication
from corral.v1.volumes_connect import VolumeServiceASGIApplication

if TYPE_CHECKING:
    from corral.jobs.runtime import JobRuntime

log = logging.getLogger("corral.server")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SANDBOX_PREFIX = "/corral.v1.SandboxService/"
_HEALTH_PREFIX = "/corral.v1.HealthService/"
_JOB_PREFIX = "/corral.v1.JobService/"
_VOLUME_PREFIX = "/corral.v1.VolumeService/"
_TEMPLATE_PREFIX = "/corral.v1.TemplateService/"
_VM_PREFIX = "/corral.v1.VmService/"
# The services that need an API key (HealthService does not).
_KEYED_PREFIXES = (_SANDBOX_PREFIX, _JOB_PREFIX, _VOLUME_PREFIX, _TEMPLATE_PREFIX, _VM_PREFIX)
# The standard gRPC services (`corral.server.grpc_std`): no key either.
_OPEN_PREFIXES = (_HEALTH_PREFIX, HEALTH_PREFIX, *REFLECTION_PREFIXES)
_API_PREFIXES = (*_KEYED_PREFIXES, *_OPEN_PREFIXES)
# The files whose services reflection lists.
_API_FILES = (sandbox_pb2, jobs_pb2, volumes_pb2, templates_pb2, vms_pb2, health_pb2)


_NO_GRPC = {
    "code": "unimplemented",
    "message": "native gRPC needs HTTP/2 trailers, which this server (uvicorn, HTTP/1.1) "
    "does not have: use the Connect protocol (any HTTP client, the Corral SDK) or gRPC-Web",
}


def _needs_trailers(scope: Scope) -> bool:
    """A native gRPC call (not gRPC-Web) on a server without the ASGI trailers extension."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            grpc = value.startswith(b"application/grpc") and not value.startswith(
                b"application/grpc-web"
            )
            return grpc and "http.response.trailers" not in scope.get("extensions", {})
    return False


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def _with_headers(send: Send, headers: dict[str, str]) -> Send:
    """`send` with `headers` added to the response's start."""
    if not headers:
        return send
    extra = [(name.encode(), value.encode()) for name, value in headers.items()]

    async def send_with_headers(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return send_with_headers


class CorralApp:
    """One ASGI application for the whole API."""

    def __init__(self, settings: Settings, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.settings = settings
        self.services = Services(
            limits=RateLimits(settings.api_rate, settings.api_burst, settings.api_streams)
        )
        self.default_key: str | None = None  # the key of the default team, after start-up
        self._jobs: JobRuntime | None = None
        self._max_message_bytes = max_message_bytes
        self.ports = PortProxy(self.services, settings.ports_domain)
        self.e2b = E2bApp(self.services, settings)
        self.metrics = MetricsEndpoint(settings, self.services)
        # In this order: the stream limit's refusal leaves as any Corral error does.
        interceptors: list[Interceptor] = [
            ErrorInterceptor(),
            StreamLimitInterceptor(self.services.limits),
        ]
        gzip = [BoundedGzip(max_message_bytes)]
        self._sandbox_app: ASGIApp = SandboxServiceASGIApplication(
            SandboxService(self.services),
            interceptors=interceptors,
            read_max_bytes=max_message_bytes,
            compressions=gzip,
            codecs=CODECS,
        )
        self._job_app: ASGIApp = JobServiceASGIApplication(
            JobHandlers(self.services),
            interceptors=interceptors,
            read_max_bytes=max_message_bytes,
            compressions=gzip,
            codecs=CODECS,
        )
        self._volume_app: ASGIApp = VolumeServiceASGIApplication(
            VolumeService(self.services),
            interceptors=interceptors,
            read_max_bytes=max_message_bytes,
            compressions=gzip,
            codecs=CODECS,
        )
        self._template_app: ASGIApp = TemplateServiceASGIApplication(
            TemplateHandlers(self.services),
            interceptors=interceptors,
            read_max_bytes=max_message_bytes,
            compressions=gzip,
            codecs=CODECS,
        )
        self._vm_app: ASGIApp = VmServiceASGIApplication(
            VmHandlers(self.services),
            interceptors=interceptors,
            read_max_bytes=max_message_bytes,
            compressions=gzip,
            codecs=CODECS,
        )
        self._health_app: ASGIApp = HealthServiceASGIApplication(
            HealthService(),
            interceptors=interceptors,
            read_max_bytes=HEALTH_MESSAGE_BYTES,
            compressions=[BoundedGzip(HEALTH_MESSAGE_BYTES)],
            codecs=CODECS,
        )
        self._open_apps: dict[str, ASGIApp] = {
            _HEALTH_PREFIX: self._health_app,
            HEALTH_PREFIX: GrpcHealthASGIApplication(
                GrpcHealth(lambda: self.services.manager is not None, self._service_names()),
                read_max_bytes=HEALTH_MESSAGE_BYTES,
            ),
        }
        for prefix, app in zip(
            REFLECTION_PREFIXES,
            reflection_apps([m.DESCRIPTOR for m in _API_FILES]),
            strict=True,
        ):
            self._open_apps[prefix] = app

    @staticmethod
    def _service_names() -> tuple[str, ...]:
        return tuple(
            s.full_name for m in _API_FILES for s in m.DESCRIPTOR.services_by_name.values()
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not spoken here
            return
        logs.start(request_id=logs.new_request_id())
        if await self.ports.serve(scope, receive, send):
            return  # it was for a sandbox's port: its traffic, not the API's
        with request_span(scope, send) as send:
            await self._serve_api(scope, receive, send)

    async def _serve_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if await self.e2b.serve(scope, receive, send):
            return  # E2B's REST API or envd (`corral.server.e2b`)
        if path.startswith(_API_PREFIXES) and _needs_trailers(scope):
            await _send_json(send, 415, _NO_GRPC)
        elif path.startswith(_API_PREFIXES) and (problem := header_problem(scope["headers"])):
            await _send_json(send, 400, {"code": "invalid_argument", "message": problem})
        elif path.startswith(_KEYED_PREFIXES):
            headers = dict(scope.get("headers", ()))
            refusal = self._refusal(headers)
            if refusal is not None:
                receive = refuse(to_connect(refusal))
                send = _with_headers(send, retry_headers(refusal))
            else:
                receive = limit_size(receive, headers, self._max_message_bytes)
                scope, receive = inflate(scope, receive, self._max_message_bytes)
            if path.startswith(_SANDBOX_PREFIX):
                app = self._sandbox_app
            elif path.startswith(_JOB_PREFIX):
                app = self._job_app
            elif path.startswith(_VOLUME_PREFIX):
                app = self._volume_app
            elif path.startswith(_VM_PREFIX):
                app = self._vm_app
            else:
                app = self._template_app
            await app(scope, disconnect.watch(receive), send)
        elif path.startswith(_OPEN_PREFIXES):
            headers = dict(scope.get("headers", ()))
            receive = limit_size(receive, headers, HEALTH_MESSAGE_BYTES)
            scope, receive = inflate(scope, receive, HEALTH_MESSAGE_BYTES)
            prefix = "/" + path.split("/")[1] + "/"
            await self._open_apps[prefix](scope, receive, send)
        elif path == METRICS_PATH:
            await self.metrics.serve(scope, send)
        elif path == "/healthz":
            started = self.services.manager is not None
            await _send_json(
                send,
                200 if started else 503,
                {"status": "serving" if started else "starting", "version": __version__},
            )
        else:
            await _send_json(
                send,
                404,
                {
                    "code": "not_found",
                    "message": f"no endpoint {path}; the API is "
                    "/corral.v1.SandboxService/<Method>, /corral.v1.JobService/<Method> "
                    "and /corral.v1.TemplateService/<Method>",
                },
            )

    def _refusal(self, headers: dict[bytes, bytes]) -> Exception | None:
        """Why a request must be refused before its body is read: no valid key, or its
        key's rate limit. An anonymous or limited caller costs no body reading and no
        decompression; the handler gets the team found here (`auth.authenticate`)."""
        if self.services.store is None:  # starting or stopping: the handler says so
            return None
        try:
            authenticate_headers(self.services, headers.get(b"authorization", b"").decode())
            self.services.limits.take_caller()
        except Exception as exc:  # Unauthenticated, RateLimited; else logged as internal
            return exc
        return None

    # -- lifespan -------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        try:
            await self._lifespan_events(receive, send)
        except asyncio.CancelledError:  # a forced exit skips the shutdown event
            log.debug("lifespan cancelled")

    async def _lifespan_events(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.error("start-up failed", extra={"error": str(exc)})
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        from corral.jobs.runtime import JobRuntime
        from corral.sandboxes import SandboxManager
        from corral.store import Store

        # First: a metrics port in use is refused before there is anything to undo.
        self.metrics.start()
        store = Store.open(self.settings)
        try:
            team, new_key = store.ensure_default_team()
            key_file = self.settings.data_dir / "default.key"
            self.default_key = new_key or key_file.read_text().strip()
            manager = SandboxManager(self.settings, store, pool_size=self.settings.pool_size)
            await manager.start()
            try:
                jobs = JobRuntime(self.settings, store, manager.engine)
                manager.resolve_template = jobs.templates.resolve
                manager.layers = jobs.templates.layers
                # The server's base (E2B's default template) gets a warm pool too.
                manager.poolable = jobs.templates.server_base.is_base
                jobs.templates.manager = manager
                await jobs.start()
            except BaseException:
                await manager.aclose()
                raise
        except BaseException:
            store.close()
            raise
        self.services.store = store
        self.services.manager = manager
        self.services.jobs = jobs.queue
        self.services.templates = jobs.templates
        self._jobs = jobs
        log.info(
            "server started",
            extra={
                "data_dir": str(self.settings.data_dir),
                "default_team": team.name,
                "default_key_file": str(key_file),
                "pool_size": self.settings.pool_size,
                "job_workers": jobs.worker.concurrency,
            },
        )

    async def stop(self) -> None:
        manager, store = self.services.manager, self.services.store
        self.ports.close()
        self.metrics.stop()
        self.services.manager = None
        self.services.jobs = None
        self.services.templates = None
        if self._jobs is not None:
            try:
                # Before the manager: the workers' sandboxes are on the manager's engine.
                await self._jobs.aclose()
            except Exception:
                log.exception("stopping the job workers failed")
            self._jobs = None
        if manager is not None:
            try:
                await manager.aclose()
            except Exception:
                log.exception("stopping the sandbox manager failed")
        if store is not None:
            store.close()
            self.services.store = None
        log.info("server stopped")


def create_app(settings: Settings) -> CorralApp:
    return CorralApp(settings)
