"""The SDK's line to the server: the generated Connect client, the key, and the one place
where Connect errors become Corral errors again (`corral._wire.from_connect`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.protocol import ProtocolType

from corral._aio import stop_tasks
from corral._wire import from_connect
from corral.client._config import ClientSettings
from corral.client._tls import http_client
from corral.v1.jobs_connect import JobServiceClient
from corral.v1.sandbox_connect import SandboxServiceClient
from corral.v1.templates_connect import TemplateServiceClient
from corral.v1.vms_connect import VmServiceClient
from corral.v1.volumes_connect import VolumeServiceClient

C = TypeVar("C")
REQ = TypeVar("REQ")
RES = TypeVar("RES")

Unary = Callable[..., Awaitable[RES]]


def _translate(exc: ConnectError, server: str) -> BaseException:
    task = asyncio.current_task()
    if exc.code is Code.CANCELED and task is not None and task.cancelling():
        # connectrpc turns our own cancellation into an error; give it back.
        return asyncio.CancelledError()
    return from_connect(exc, server)


class Connection:
    """One client of `corral.v1.SandboxService` with its key; shared by a sandbox's parts.

    `jobs`, `volumes` and `templates` are clients of `corral.v1.JobService`,
    `VolumeService` and `TemplateService` on the same server, each made on first use.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        # https: verified with the settings' CA file, else the system's CAs (never not).
        # Native gRPC needs HTTP/2, which pyqwest speaks in clear text only when told to.
        # Either way the transport is the process's, shared by every connection.
        self._http = http_client(settings.ca_file, http2=settings.protocol == "grpc")
        self.rpc = self._client(SandboxServiceClient)
        self._headers: Mapping[str, str] = (
            {"authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        )
        self._timeout_ms = int(settings.timeout * 1000)
        self._jobs: JobServiceClient | None = None
        self._templates: TemplateServiceClient | None = None
        self._volumes: VolumeServiceClient | None = None
        self._vms: VmServiceClient | None = None
        # Readers of background commands' output: `aclose` stops them, or their open
        # streams would keep the server's graceful shutdown waiting its whole grace.
        self._followers: set[asyncio.Task[Any]] = set()

    @property
    def jobs(self) -> JobServiceClient:
        if self._jobs is None:
            self._jobs = self._client(JobServiceClient)
        return self._jobs

    @property
    def volumes(self) -> VolumeServiceClient:
        if self._volumes is None:
            self._volumes = self._client(VolumeServiceClient)
        return self._volumes

    @property
    def vms(self) -> VmServiceClient:
        if self._vms is None:
            self._vms = self._client(VmServiceClient)
        return self._vms

    @property
    def templates(self) -> TemplateServiceClient:
        if self._templates is None:
            self._templates = self._client(TemplateServiceClient)
        return self._templates

    def _client(self, cls: Callable[..., C]) -> C:
        grpc = self.settings.protocol == "grpc"
        return cls(
            self.settings.server,
            accept_compression=(),  # loopback and LANs: compression costs more than it saves
            send_compression=None,
            protocol=ProtocolType.GRPC if grpc else ProtocolType.CONNECT,
            http_client=self._http,
        )

    async def call(self, method: Callable[..., Awaitable[RES]], request: object) -> RES:
        """A unary call, with the key and the timeout."""
        try:
            return await method(request, headers=self._headers, timeout_ms=self._timeout_ms)
        except ConnectError as exc:
            raise _translate(exc, self.settings.server) from None

    async def stream(
        self, method: Callable[..., AsyncIterator[RES]], request: object
    ) -> AsyncGenerator[RES, None]:
        """A server-streaming call (no timeout: it lasts as long as the work)."""
        # Closed here, in the task that reads it, when the reader stops early (a command's
        # end, a cancel): left to the garbage collector or the loop's shutdown, the RPC's
        # own generator is closed from another task and prints a traceback at exit.
        messages = method(request, headers=self._headers)
        try:
            async for message in messages:
                yield message
        except ConnectError as exc:
            raise _translate(exc, self.settings.server) from None
        finally:
            aclose = getattr(messages, "aclose", None)
            if aclose is not None:
                await aclose()

    async def upload(
        self, method: Callable[..., Awaitable[RES]], requests: AsyncIterator[object]
    ) -> RES:
        """A client-streaming call (no timeout: it lasts as long as the upload)."""
        try:
            return await method(requests, headers=self._headers)
        except ConnectError as exc:
            raise _translate(exc, self.settings.server) from None

    def follow(self, task: asyncio.Task[Any]) -> None:
        """Own `task`, a background reader of a stream: `aclose` stops it."""
        self._followers.add(task)
        task.add_done_callback(self._followers.discard)

    async def aclose(self) -> None:
        await stop_tasks(*self._followers)
        await self.rpc.close()
        if self._jobs is not None:
            await self._jobs.close()
        if self._volumes is not None:
            await self._volumes.close()
        if self._vms is not None:
            await self._vms.close()
        if self._templates is not None:
            await self._templates.close()


async def call_once(
    method: Callable[[Connection], Callable[..., Awaitable[RES]]],
    request: object,
    settings: ClientSettings,
) -> RES:
    """One unary call (`method` of a connection: `lambda c: c.templates.get`) on a
    connection of its own, closed after: the resources' static methods."""
    connection = Connection(settings)
    try:
        return await connection.call(method(connection), request)
    finally:
        await connection.aclose()
