"""SandboxService RPCs of files: read (streamed), write (streamed), list, stat, mkdir, rm, mv.

Paths are resolved by the guest agent inside the sandbox (relative ones from /workspace),
so `..` cannot leave it; the server only refuses what no path can be (empty, NUL).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from corral.errors import InvalidRequest
from corral.server import convert
from corral.server.base import Handlers
from corral.v1 import sandbox_pb2 as pb

Ctx = RequestContext[Any, Any]
_MAX_DEPTH = 64


class FileHandlers(Handlers):
    async def read_file(
        self, request: pb.ReadFileRequest, ctx: Ctx
    ) -> AsyncIterator[pb.ReadFileResponse]:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        path = convert.path(request.path)
        convert.not_negative(request.offset, "offset")
        convert.not_negative(request.length, "length")
        chunks = self._manager.files.read_file(
            team, sandbox_id, path, offset=request.offset, length=request.length or None
        )
        sent = False
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                sent = True
                yield pb.ReadFileResponse(data=chunk)
        if not sent:  # an empty file is one empty message, so a client sees it exists
            yield pb.ReadFileResponse()

    async def write_file(
        self, request: AsyncIterator[pb.WriteFileRequest], ctx: Ctx
    ) -> pb.WriteFileResponse:
        team = self._team(ctx)
        first = await anext(aiter(request), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequest("the first WriteFile message must carry the header")
        header = first.header
        sandbox_id = convert.sandbox_id(header.sandbox_id)
        path = convert.path(header.path)
        if header.mode > 0o7777:
            raise InvalidRequest(f"mode={header.mode:o} is not a file mode (like 644)")

        async def data() -> AsyncIterator[bytes]:
            async for message in request:
                if message.WhichOneof("part") == "header":
                    raise InvalidRequest("only the first WriteFile message may carry a header")
                yield message.data

        info = await self._manager.files.write_file(
            team, sandbox_id, path, data(), mode=header.mode or 0o644, append=header.append
        )
        return pb.WriteFileResponse(entry=convert.entry(info))

    async def list_dir(self, request: pb.ListDirRequest, ctx: Ctx) -> pb.ListDirResponse:
        team = self._team(ctx)
        if not 0 <= request.depth <= _MAX_DEPTH:
            raise InvalidRequest(f"depth={request.depth} is out of range: use 1 to {_MAX_DEPTH}")
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        entries = await self._manager.files.list_dir(
            team, sandbox_id, convert.path(request.path), depth=request.depth or 1
        )
        return pb.ListDirResponse(entries=[convert.entry(e) for e in entries])

    async def stat(self, request: pb.StatRequest, ctx: Ctx) -> pb.StatResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        info = await self._manager.files.stat(team, sandbox_id, convert.path(request.path))
        return pb.StatResponse(entry=convert.entry(info))

    async def make_dir(self, request: pb.MakeDirRequest, ctx: Ctx) -> pb.MakeDirResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        created = await self._manager.files.make_dir(team, sandbox_id, convert.path(request.path))
        return pb.MakeDirResponse(created=created)

    async def remove(self, request: pb.RemoveRequest, ctx: Ctx) -> pb.RemoveResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        await self._manager.files.remove(
            team, sandbox_id, convert.path(request.path), recursive=request.recursive
        )
        return pb.RemoveResponse()

    async def move(self, request: pb.MoveRequest, ctx: Ctx) -> pb.MoveResponse:
        team = self._team(ctx)
        info = await self._manager.files.move(
            team,
            convert.sandbox_id(request.sandbox_id),
            convert.path(request.source, "source"),
            convert.path(request.destination, "destination"),
            overwrite=not request.no_overwrite,
        )
        return pb.MoveResponse(entry=None if info is None else convert.entry(info))
