"""SandboxService RPCs of commands: Exec and Attach (streamed), input, signals, terminal
size, the process list."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from connectrpc.request import RequestContext

from corral.errors import InvalidRequest
from corral.guest import OutputChunk
from corral.isolation.backend import check_command_timeout
from corral.sandboxes.commands import ExecEvent, Started
from corral.server import convert, disconnect
from corral.server.base import Handlers
from corral.terminal import PtySize
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


def _pid(value: int) -> int:
    if value <= 0:
        raise InvalidRequest(f"pid={value} is not a process id; `corral sandbox ps` lists them")
    return value


def _pty_size(size: pb.PtySize) -> PtySize:
    return PtySize(size.cols, size.rows)  # which says what a size may be


async def _responses(events: AsyncGenerator[ExecEvent]) -> AsyncIterator[pb.ExecResponse]:
    async with contextlib.aclosing(events):
        async for event in events:
            yield _exec_response(event)


def _exec_response(event: ExecEvent) -> pb.ExecResponse:
    if isinstance(event, Started):
        return pb.ExecResponse(start=pb.ExecStart(pid=event.pid))
    if isinstance(event, OutputChunk):
        if event.stream == "stdout":
            return pb.ExecResponse(stdout=event.data)
        return pb.ExecResponse(stderr=event.data)
    return pb.ExecResponse(
        end=pb.ExecEnd(
            exit_code=event.exit_code,
            signal=event.signal or 0,
            reason=event.reason,
            error=event.error or "",
            output_bytes=event.output_bytes,
        )
    )


class CommandHandlers(Handlers):
    async def exec(self, request: pb.ExecRequest, ctx: Ctx) -> AsyncIterator[pb.ExecResponse]:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        argv_or_cmd = _check_exec(request)
        envs = convert.strings(dict(request.envs), "envs")
        events = self._manager.commands.exec(
            team,
            sandbox_id,
            argv_or_cmd,
            envs=envs,
            cwd=request.cwd or None,
            user=request.user or None,
            timeout=request.timeout_seconds or None,
            output_limit=request.output_limit or None,
            stdin=request.stdin,
            background=request.background,
            tag=request.tag or None,
            pty=_pty_size(request.pty) if request.HasField("pty") else None,
            client_gone=disconnect.current(),
        )
        async for response in _responses(events):
            yield response

    async def attach(self, request: pb.AttachRequest, ctx: Ctx) -> AsyncIterator[pb.ExecResponse]:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        events = self._manager.commands.attach(
            team, sandbox_id, _pid(request.pid), client_gone=disconnect.current()
        )
        async for response in _responses(events):
            yield response

    async def send_input(self, request: pb.SendInputRequest, ctx: Ctx) -> pb.SendInputResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        await self._manager.commands.send_input(team, sandbox_id, _pid(request.pid), request.data)
        return pb.SendInputResponse()

    async def close_input(self, request: pb.CloseInputRequest, ctx: Ctx) -> pb.CloseInputResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        await self._manager.commands.close_input(team, sandbox_id, _pid(request.pid))
        return pb.CloseInputResponse()

    async def signal(self, request: pb.SignalRequest, ctx: Ctx) -> pb.SignalResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        pid = _pid(request.pid)
        if not 1 <= request.signal <= signal.SIGRTMAX:
            raise InvalidRequest(f"signal={request.signal} is not a signal number (9 is SIGKILL)")
        await self._manager.commands.signal(
            team, sandbox_id, pid, request.signal, group=request.group
        )
        return pb.SignalResponse()

    async def resize(self, request: pb.ResizeRequest, ctx: Ctx) -> pb.ResizeResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        pid, size = _pid(request.pid), _pty_size(request.size)
        await self._manager.commands.resize(team, sandbox_id, pid, size.cols, size.rows)
        return pb.ResizeResponse()

    async def list_processes(
        self, request: pb.ListProcessesRequest, ctx: Ctx
    ) -> pb.ListProcessesResponse:
        team = self._team(ctx)
        sandbox_id = convert.sandbox_id(request.sandbox_id)
        processes = await self._manager.commands.processes(team, sandbox_id)
        return pb.ListProcessesResponse(processes=[convert.process(p) for p in processes])
