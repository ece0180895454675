"""envd's `filesystem.Filesystem` service over Corral's sandbox files.

Every call acts as the call's user (`Authorization: Basic`, else the template's default
user): that user's permissions, new files its own, relative paths from its home
directory, as E2B's envd does. Errors keep E2B's codes: NOT_FOUND for a missing path,
ALREADY_EXISTS from MakeDir on an existing directory; Remove of a missing path succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from corral.envd import filesystem_pb2 as fs
from corral.errors import FileExists, FileNotFound, InvalidRequest
from corral.guest import GuestWatch
from corral.server import convert
from corral.server.base import Handlers, Services
from corral.server.e2b.call import EnvdCall, current_call
from corral.server.e2b.entries import entry_info, event
from corral.server.e2b.watchers import Watchers

Ctx = RequestContext[Any, Any]
_MAX_DEPTH = 64
# How often WatchDir sends a keepalive when nothing happens (the SDK asks with a header).
_KEEPALIVE_HEADER = "keepalive-ping-interval"
_DEFAULT_KEEPALIVE = 50.0
_MIN_KEEPALIVE = 1.0


class FilesystemHandlers(Handlers):
    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._watchers = Watchers()

    def _acting(self, path: str) -> tuple[EnvdCall, str, dict[str, Any]]:
        call = current_call()
        return call, convert.path(path), {"user": call.user, "home": True}

    async def stat(self, request: fs.StatRequest, ctx: Ctx) -> fs.StatResponse:
        call, path, acting = self._acting(request.path)
        info = await self._manager.files.stat(call.team, call.sandbox_id, path, **acting)
        return fs.StatResponse(entry=entry_info(info))

    async def make_dir(self, request: fs.MakeDirRequest, ctx: Ctx) -> fs.MakeDirResponse:
        call, path, acting = self._acting(request.path)
        files = self._manager.files
        if not await files.make_dir(call.team, call.sandbox_id, path, **acting):
            raise FileExists(f"directory {path} already exists")
        info = await files.stat(call.team, call.sandbox_id, path, **acting)
        return fs.MakeDirResponse(entry=entry_info(info))

    async def move(self, request: fs.MoveRequest, ctx: Ctx) -> fs.MoveResponse:
        call = current_call()
        source = convert.path(request.source, "source")
        destination = convert.path(request.destination, "destination")
        files = self._manager.files
        acting: dict[str, Any] = {"user": call.user, "home": True}
        moved = await files.move(call.team, call.sandbox_id, source, destination, **acting)
        if moved is None:  # an agent that does not say: ask
            moved = await files.stat(call.team, call.sandbox_id, destination, **acting)
        return fs.MoveResponse(entry=entry_info(moved))

    async def list_dir(self, request: fs.ListDirRequest, ctx: Ctx) -> fs.ListDirResponse:
        call, path, acting = self._acting(request.path)
        if request.depth > _MAX_DEPTH:
            raise InvalidRequest(f"depth={request.depth} is too deep: use 1 to {_MAX_DEPTH}")
        found = await self._manager.files.list_dir(
            call.team, call.sandbox_id, path, depth=request.depth or 1, **acting
        )
        found.sort(key=lambda info: info.path)
        return fs.ListDirResponse(entries=[entry_info(info) for info in found])

    async def remove(self, request: fs.RemoveRequest, ctx: Ctx) -> fs.RemoveResponse:
        call, path, acting = self._acting(request.path)
        with contextlib.suppress(FileNotFound):  # E2B: removing what is not there succeeds
            await self._manager.files.remove(
                call.team, call.sandbox_id, path, recursive=True, **acting
            )
        return fs.RemoveResponse()

    # -- watching ---------------------------------------------------------------------

    async def _watch(self, path: str, recursive: bool, include_entry: bool) -> GuestWatch:
        call, checked, acting = self._acting(path)
        return await self._manager.files.watch(
            call.team, call.sandbox_id, checked, recursive=recursive, entries=include_entry,
            **acting,
        )  # fmt: skip

    async def watch_dir(
        self, request: fs.WatchDirRequest, ctx: Ctx
    ) -> AsyncIterator[fs.WatchDirResponse]:
        watch = await self._watch(request.path, request.recursive, request.include_entry)
        interval = keepalive_interval(ctx)
        try:
            yield fs.WatchDirResponse(start=fs.WatchDirResponse.StartEvent())
            while True:
                try:
                    found = await asyncio.wait_for(watch.wait(), interval)
                except TimeoutError:
                    yield fs.WatchDirResponse(keepalive=fs.WatchDirResponse.KeepAlive())
                    continue
                for item in found:
                    yield fs.WatchDirResponse(filesystem=event(item))
        finally:
            await watch.aclose()

    async def create_watcher(
        self, request: fs.CreateWatcherRequest, ctx: Ctx
    ) -> fs.CreateWatcherResponse:
        call = current_call()
        watch = await self._watch(request.path, request.recursive, request.include_entry)
        try:
            watcher_id = self._watchers.add(call.team.id, call.sandbox_id, watch)
        except BaseException:
            await watch.aclose()
            raise
        return fs.CreateWatcherResponse(watcher_id=watcher_id)

    async def get_watcher_events(
        self, request: fs.GetWatcherEventsRequest, ctx: Ctx
    ) -> fs.GetWatcherEventsResponse:
        call = current_call()
        watcher = self._watchers.get(call.team.id, call.sandbox_id, request.watcher_id)
        # Everything changed before this call (an upload that returned, a command that
        # ended) is reported now, not on a later poll.
        await self._manager.files.sync(call.team, call.sandbox_id)
        found = watcher.watch.take()
        return fs.GetWatcherEventsResponse(events=[event(item) for item in found])

    async def remove_watcher(
        self, request: fs.RemoveWatcherRequest, ctx: Ctx
    ) -> fs.RemoveWatcherResponse:
        call = current_call()
        watcher = self._watchers.pop(call.team.id, call.sandbox_id, request.watcher_id)
        await watcher.watch.aclose()
        return fs.RemoveWatcherResponse()


def keepalive_interval(ctx: Ctx) -> float:
    """Seconds between WatchDir keepalives: the client's `Keepalive-Ping-Interval`."""
    value = ctx.request_headers.get(_KEEPALIVE_HEADER)
    try:
        seconds = float(value) if value else _DEFAULT_KEEPALIVE
    except ValueError:
        seconds = _DEFAULT_KEEPALIVE
    return max(seconds, _MIN_KEEPALIVE)
