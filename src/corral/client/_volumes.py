"""`AsyncVolume`: your team's named volumes on a Corral server.

    info = await AsyncVolume.create("cache", size_mib=512)
    box = await AsyncSandbox.create(volumes=["cache:/data"])      # mounted at /data
    await AsyncVolume.delete("cache")      # refused while a sandbox has it mounted

The server and API key come from the arguments, else `CORRAL_SERVER` and
`CORRAL_API_KEY`, else the CLI's current context (see `corral context`).
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from corral.client._config import ClientSettings
from corral.client._connection import Connection, call_once
from corral.client._models import VolumeInfo
from corral.errors import InvalidRequest
from corral.v1 import volumes_pb2 as pb

R = TypeVar("R")


async def _call(
    method: Callable[[Connection], Callable[..., Awaitable[R]]],
    request: object,
    server: str | None,
    api_key: str | None,
    context: str | None,
    ca_file: str | os.PathLike[str] | None,
    request_timeout: float | None,
) -> R:
    settings = ClientSettings.resolve(
        server=server, api_key=api_key, context=context, ca_file=ca_file, timeout=request_timeout
    )
    return await call_once(method, request, settings)


def _name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidRequest(f"a volume is named by a str, not {type(name).__name__}")
    return name


class AsyncVolume:
    """Your team's named volumes: persistent directories that outlive sandboxes, each
    with a size bound, mounted with `volumes=` on a sandbox or a job."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise InvalidRequest(
            "AsyncVolume has no instances: use `await AsyncVolume.create(name, size_mib=N)`, "
            "`.get(name)`, `.list()` or `.delete(name)`"
        )

    @staticmethod
    async def create(
        name: str,
        *,
        size_mib: int,
        api_key: str | None = None,
        server: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
    ) -> VolumeInfo:
        """Create an empty volume of at most `size_mib` MiB (writes past it: ENOSPC)."""
        if isinstance(size_mib, bool) or not isinstance(size_mib, int):
            raise InvalidRequest(f"size_mib must be a whole number of MiB, not {size_mib!r}")
        request = pb.CreateVolumeRequest(name=_name(name), size_mib=size_mib)
        reply = await _call(
            lambda c: c.volumes.create, request, server, api_key, context, ca_file, request_timeout
        )
        return VolumeInfo.from_proto(reply.volume)

    @staticmethod
    async def get(
        name: str,
        *,
        api_key: str | None = None,
        server: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
    ) -> VolumeInfo:
        """The volume `name` of your team (UnknownVolume if it has none)."""
        request = pb.GetVolumeRequest(name=_name(name))
        reply = await _call(
            lambda c: c.volumes.get, request, server, api_key, context, ca_file, request_timeout
        )
        return VolumeInfo.from_proto(reply.volume)

    @staticmethod
    async def list(
        *,
        api_key: str | None = None,
        server: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
    ) -> builtins.list[VolumeInfo]:
        """Your team's volumes, by name."""
        reply = await _call(
            lambda c: c.volumes.list,
            pb.ListVolumesRequest(),
            server,
            api_key,
            context,
            ca_file,
            request_timeout,
        )
        return [VolumeInfo.from_proto(v) for v in reply.volumes]

    @staticmethod
    async def delete(
        name: str,
        *,
        api_key: str | None = None,
        server: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
    ) -> None:
        """Delete the volume and its data; VolumeInUse while a sandbox has it mounted."""
        request = pb.DeleteVolumeRequest(name=_name(name))
        await _call(
            lambda c: c.volumes.delete, request, server, api_key, context, ca_file, request_timeout
        )
