"""SandboxService RPCs of commands: Exec (streamed), stdin, signals, the process list."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from corral.errors import InvalidRequest
from corral.isolation import Command
from corral.isolation.backend import check_command_timeout
from corral.server import convert, disconnect
from corral.server.base import Handlers
from corral.v1 import sandbox_pb2 as pb

Ctx = RequestContext[Any, Any]


def _check_exec(request: pb.ExecRequest) -> list[str] | str:
    if bool(request.argv) == bool(request.cmd):
        raise InvalidRequest("pass either argv (a program and its arguments) or cmd (a shell line)")
    if any("\x00" in arg for arg in request.argv) or "\x00" in request.cmd:
        raise InvalidRequest("the command contains a NUL character")
    # 0 is no timeout; anything else must be in range (negative, NaN and 1e300 are not).
    check_command_timeout(request.timeout_seconds or None, "timeout_seconds")
    convert.not_negative(request.output_limit, "output_limit")
    if request.cwd:
        convert.path(request.cwd, "cwd")
    return list(request.argv) if request.argv else request.cmd


async def _stop_on_disconnect(gone: asyncio.Event, command: Command, background: bool) -> None:
    """A foreground command dies with its client; a background one is left running."""
    await gone.wait()
    if background:
        await command.detach()
    else:
        await command.kill()


def _pid(value: int) -> int:
    if value <= 0:
        raise InvalidRequest(f"pid={value} is not a process id; `corral sandbox ps` lists them")
    return value


class CommandHandlers(Handlers):
    async def exec(self, request: pb.ExecRequest, ctx: Ctx) -> AsyncIterator[pb.ExecResponse]:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        argv_or_cmd = _check_exec(request)
        envs = convert.strings(dict(request.envs), "envs")
        box = await self._manager.running(team, sandbox_id)
        command = await box.exec(
            argv_or_cmd,
            env={**self._manager.envs(sandbox_id), **envs},
            cwd=request.cwd or None,
            user=request.user or None,
            timeout=request.timeout_seconds or None,
            output_limit=request.output_limit or None,
            stdin=request.stdin,
            background=request.background,
            tag=request.tag or None,
        )
        gone = disconnect.current()
        watcher = (
            asyncio.create_task(_stop_on_disconnect(gone, command, request.background))
            if gone is not None
            else None
        )
        self._commands.add(sandbox_id, command)
        ended = False
        try:
            yield pb.ExecResponse(start=pb.ExecStart(pid=command.pid))
            async for chunk in command:
                self._manager.touch(sandbox_id)
                if chunk.stream == "stdout":
                    yield pb.ExecResponse(stdout=chunk.data)
                else:
                    yield pb.ExecResponse(stderr=chunk.data)
            result = await command.wait()
            ended = True
            yield pb.ExecResponse(
                end=pb.ExecEnd(
                    exit_code=result.exit_code,
                    signal=result.signal or 0,
                    reason=result.reason,
                    error=result.error or "",
                    output_bytes=result.output_bytes,
                )
            )
        finally:
            if watcher is not None:
                watcher.cancel()
            self._commands.discard(sandbox_id, command)
            if not ended:
                with contextlib.suppress(Exception):
                    if not request.background:
                        await command.kill()
                    await command.detach()

    async def send_input(self, request: pb.SendInputRequest, ctx: Ctx) -> pb.SendInputResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        await self._manager.running(team, sandbox_id)
        await self._commands.get(sandbox_id, _pid(request.pid)).write_stdin(request.data)
        self._manager.touch(sandbox_id)
        return pb.SendInputResponse()

    async def close_input(self, request: pb.CloseInputRequest, ctx: Ctx) -> pb.CloseInputResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        await self._manager.running(team, sandbox_id)
        await self._commands.get(sandbox_id, _pid(request.pid)).close_stdin()
        return pb.CloseInputResponse()

    async def signal(self, request: pb.SignalRequest, ctx: Ctx) -> pb.SignalResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        pid = _pid(request.pid)
        if not 1 <= request.signal <= signal.SIGRTMAX:
            raise InvalidRequest(f"signal={request.signal} is not a signal number (9 is SIGKILL)")
        box = await self._manager.running(team, sandbox_id)
        command = self._commands.find(sandbox_id, pid)
        if command is not None:  # through the Command, so a kill is reported as "killed"
            await command.signal(request.signal, group=request.group)
        else:
            await box.signal(pid, request.signal, group=request.group)
        return pb.SignalResponse()

    async def list_processes(
        self, request: pb.ListProcessesRequest, ctx: Ctx
    ) -> pb.ListProcessesResponse:
        team = self._team(ctx)
        box = await self._manager.running(team, convert.sandbox_id(request.sandbox_id))
        return pb.ListProcessesResponse(
            processes=[convert.process(p) for p in await box.processes()]
        )
