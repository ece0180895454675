"""The VolumeService RPCs: a team's named volumes (`corral.sandboxes.volumes`)."""

from __future__ import annotations

import asyncio
from typing import Any

from connectrpc.request import RequestContext

from corral.server import convert
from corral.server.base import Handlers
from corral.v1 import volumes_pb2 as pb

Ctx = RequestContext[Any, Any]


class VolumeService(Handlers):
    """Every RPC of `corral.v1.VolumeService`: each authenticates, then calls the manager's
    volumes. Creating and deleting touch the disk (mkfs, an flock that waits for a
    sandbox's attach): in a thread, never on the event loop."""

    async def create(self, request: pb.CreateVolumeRequest, ctx: Ctx) -> pb.CreateVolumeResponse:
        team = self._team(ctx)
        volumes = self._manager.volumes
        row = await asyncio.to_thread(volumes.create, team, request.name, request.size_mib)
        return pb.CreateVolumeResponse(volume=convert.volume(row))

    async def get(self, request: pb.GetVolumeRequest, ctx: Ctx) -> pb.GetVolumeResponse:
        team = self._team(ctx)
        row = self._manager.volumes.get(team, request.name)
        return pb.GetVolumeResponse(volume=convert.volume(row))

    async def list(self, request: pb.ListVolumesRequest, ctx: Ctx) -> pb.ListVolumesResponse:
        team = self._team(ctx)
        rows = self._manager.volumes.list(team)
        return pb.ListVolumesResponse(volumes=[convert.volume(row) for row in rows])

    async def delete(self, request: pb.DeleteVolumeRequest, ctx: Ctx) -> pb.DeleteVolumeResponse:
        team = self._team(ctx)
        await asyncio.to_thread(self._manager.volumes.delete, team, request.name)
        return pb.DeleteVolumeResponse()
