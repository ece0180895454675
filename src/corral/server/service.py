"""The SandboxService and HealthService implementations the ASGI app serves."""

from __future__ import annotations

from typing import Any

from connectrpc.request import RequestContext

from corral import __version__
from corral.server.commands import CommandHandlers
from corral.server.files import FileHandlers
from corral.server.lifecycle import LifecycleHandlers
from corral.v1 import health_pb2


class SandboxService(LifecycleHandlers, CommandHandlers, FileHandlers):
    """Every RPC of `corral.v1.SandboxService`: each authenticates, then calls the manager."""


class HealthService:
    """`corral.v1.HealthService`: needs no key."""

    async def check(
        self, request: health_pb2.CheckRequest, ctx: RequestContext[Any, Any]
    ) -> health_pb2.CheckResponse:
        return health_pb2.CheckResponse(status="serving", version=__version__)
