"""envd's `process.Process` service on Corral's sandboxes (E2B's commands and PTYs).

Each call works on the sandbox `current_call()` names, as its user, through
`manager.commands` like Corral's own Exec (`corral.server.commands`). What differs is
E2B's model of a process: every process outlives the stream that started it (so it runs
as a background command, and `Connect` attaches to it: the manager hands its output to
every stream that follows it), commands start in the user's home, `status` reads like
Go's `ProcessState` ("exit status 1", "signal: killed"), idle streams get keepalives,
and a stream whose sandbox dies breaks as a transport failure (`broken.break_stream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from corral.envd import process_pb2 as pb
from corral.errors import (
    CommandError,
    CorralError,
    InvalidRequest,
    NotFound,
    SandboxNotRunning,
)
from corral.guest import ExecResult, OutputChunk
from corral.sandboxes.commands import ExecEvent, PtySize, Started
from corral.server import convert, disconnect
from corral.server.base import Handlers, Services
from corral.server.e2b.broken import break_stream
from corral.server.e2b.call import EnvdCall, current_call

Ctx = RequestContext[Any, Any]

# What envd gives a terminal unless the caller's envs say otherwise.
PTY_ENVS = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
# Seconds between keepalive events on an idle stream when the client names none
# (`Keepalive-Ping-Interval`, which E2B's SDK sends as 50), and the range it may name.
KEEPALIVE_SECONDS = 50.0
KEEPALIVE_RANGE = (1.0, 300.0)
# E2B streams a process's output and never collects it, so the sandbox's cap on collected
# output (64 MiB by default) would kill a long-running server for its logs: the largest
# limit the sandbox's limits allow instead (as Corral's terminals have none).
OUTPUT_LIMIT = 1 << 40
_SIGNALS = {pb.SIGNAL_SIGKILL: signal.SIGKILL, pb.SIGNAL_SIGTERM: signal.SIGTERM}
# How long a SIGKILL's answer waits for the agent to reap the process: E2B code checks
# `kill -0 PID` right after `commands.kill(PID)`, which a zombie would still pass.
_REAP_SECONDS = 2.0
_MAX_PTY_CELLS = 10_000


@dataclass(frozen=True)
class Launch:
    """How a process was started through E2B: what `List` reports, how its output and
    input go (a terminal's output is `pty` data; without stdin, input is refused)."""

    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None
    pty: bool
    stdin: bool


def _launch(request: pb.StartRequest) -> Launch:
    config = request.process
    if not config.cmd:
        raise InvalidRequest("process.cmd is empty; pass the program to run, e.g. /bin/bash")
    if any("\x00" in arg for arg in [config.cmd, *config.args]):
        raise InvalidRequest("process.cmd or process.args contains a NUL character")
    envs = convert.strings(dict(config.envs), "envs")
    pty = request.HasField("pty")
    return Launch(
        cmd=config.cmd,
        args=list(config.args),
        envs={**PTY_ENVS, **envs} if pty else envs,
        cwd=convert.path(config.cwd, "process.cwd") if config.HasField("cwd") else None,
        tag=request.tag if request.HasField("tag") else None,
        pty=pty,
        # Unset means true (older SDKs do not send it); a terminal always reads input.
        stdin=pty or not request.HasField("stdin") or request.stdin,
    )


def _pty_size(pty: pb.PTY) -> PtySize:
    cols, rows = pty.size.cols, pty.size.rows
    if not (0 < cols <= _MAX_PTY_CELLS and 0 < rows <= _MAX_PTY_CELLS):
        raise InvalidRequest(
            f"pty.size {cols}x{rows} is not a terminal size: cols and rows must be 1 to "
            f"{_MAX_PTY_CELLS}"
        )
    return PtySize(cols=cols, rows=rows)


def _status(result: ExecResult) -> str:
    """How Go's `ProcessState.String()` (what envd sends) reads for this ending."""
    if result.signal:
        try:
            name = signal.strsignal(result.signal) or f"signal {result.signal}"
        except ValueError:
            name = f"signal {result.signal}"
        return f"signal: {name.lower()}"
    return f"exit status {result.exit_code}"


def _event(item: Started | OutputChunk | ExecResult, pty: bool) -> pb.ProcessEvent:
    if isinstance(item, Started):
        return pb.ProcessEvent(start=pb.ProcessEvent.StartEvent(pid=item.pid))
    if isinstance(item, OutputChunk):
        if pty:
            return pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(pty=item.data))
        if item.stream == "stdout":
            return pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(stdout=item.data))
        return pb.ProcessEvent(data=pb.ProcessEvent.DataEvent(stderr=item.data))
    # A signal's end is exit code -1 and exited false, as Go reports it.
    signalled = bool(item.signal)
    end = pb.ProcessEvent.EndEvent(
        exit_code=-1 if signalled else item.exit_code, exited=not signalled, status=_status(item)
    )
    if item.error:
        end.error = item.error
    elif item.reason not in ("exited", "killed"):  # timeout, output_limit, oom_killed
        end.error = item.reason
    return pb.ProcessEvent(end=end)


def _keepalive_seconds(ctx: Ctx) -> float:
    """The client's `Keepalive-Ping-Interval` in seconds, within `KEEPALIVE_RANGE`."""
    value = ctx.request_headers.get("keepalive-ping-interval")
    try:
        seconds = float(value) if value else KEEPALIVE_SECONDS
    except ValueError:
        return KEEPALIVE_SECONDS
    if math.isnan(seconds):
        return KEEPALIVE_SECONDS
    low, high = KEEPALIVE_RANGE
    return min(max(seconds, low), high)


class ProcessHandlers(Handlers):
    """`process.Process` for the E2B sandbox of each call."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        # The processes started here, by (sandbox, pid), until they are seen to end (or
        # their sandbox is: `_forget_ended`).
        self._launches: dict[tuple[str, int], Launch] = {}

    # -- streams ------------------------------------------------------------------------

    async def start(self, request: pb.StartRequest, ctx: Ctx) -> AsyncIterator[pb.StartResponse]:
        call = current_call()
        launch = _launch(request)
        size = _pty_size(request.pty) if launch.pty else None
        self._forget_ended()
        events = self._manager.commands.exec(
            call.team,
            call.sandbox_id,
            [launch.cmd, *launch.args],
            envs=launch.envs,
            cwd=launch.cwd,
            user=call.user,
            home=True,  # envd's cwd: the user's home, and relative paths from it
            output_limit=OUTPUT_LIMIT,
            stdin=launch.stdin,
            background=True,  # it outlives this stream, as in envd
            tag=launch.tag,
            pty=size,
            client_gone=disconnect.current(),
        )
        async for event in self._follow(call, events, launch, ctx):
            yield pb.StartResponse(event=event)

    async def connect(
        self, request: pb.ConnectRequest, ctx: Ctx
    ) -> AsyncIterator[pb.ConnectResponse]:
        call = current_call()
        pid = await self._pid(call, request.process)
        events = self._manager.commands.attach(
            call.team, call.sandbox_id, pid, client_gone=disconnect.current()
        )
        launch = self._launches.get((call.sandbox_id, pid))
        async for event in self._follow(call, events, launch, ctx):
            yield pb.ConnectResponse(event=event)

    async def _follow(
        self, call: EnvdCall, events: AsyncGenerator[ExecEvent], launch: Launch | None, ctx: Ctx
    ) -> AsyncIterator[pb.ProcessEvent]:
        """The events of one stream: start, then output and keepalives, then the end."""
        pty = launch is not None and launch.pty
        keepalive = _keepalive_seconds(ctx)
        loop = asyncio.get_running_loop()
        # Connect-Timeout-Ms bounds the stream (not the process). Checked around each wait
        # rather than with a timeout around the yields: a cancellation landing while the
        # caller sends an event would be connectrpc's, not ours.
        timeout_ms = ctx.timeout_ms
        deadline = None if timeout_ms is None else loop.time() + timeout_ms / 1000
        async with contextlib.aclosing(events):
            started = await anext(events)
            assert isinstance(started, Started)
            pid = started.pid
            if launch is not None:
                self._launches[(call.sandbox_id, pid)] = launch
            yield _event(started, pty)
            # The next event is awaited in a task of its own: waiting with a timeout
            # (for a keepalive) must not cancel the stream under it.
            following: asyncio.Task[ExecEvent] | None = None
            try:
                while True:
                    wait = keepalive
                    if deadline is not None:
                        if (left := deadline - loop.time()) <= 0:
                            raise ConnectError(
                                Code.DEADLINE_EXCEEDED,
                                f"the stream of process {pid} reached its Connect-Timeout-Ms; "
                                "the process goes on: Connect to follow it",
                            )
                        wait = min(wait, left)
                    if following is None:
                        following = asyncio.ensure_future(anext(events))
                    done, _ = await asyncio.wait({following}, timeout=wait)
                    if not done:
                        if deadline is None or loop.time() < deadline:
                            yield pb.ProcessEvent(keepalive=pb.ProcessEvent.KeepAlive())
                        continue
                    try:
                        event = following.result()
                    except StopAsyncIteration:  # its client went away: nothing more to say
                        return
                    except CorralError:
                        if await self._gone(call):  # its agent died with the sandbox
                            break_stream()
                        raise
                    following = None
                    if isinstance(event, ExecResult):
                        self._launches.pop((call.sandbox_id, pid), None)
                        # The engine ends a killed sandbox's commands as "killed"; for E2B
                        # that is the connection breaking, not the process's end.
                        if event.reason == "killed" and await self._gone(call):
                            break_stream()
                            raise SandboxNotRunning(event.error or "the sandbox has ended")
                    yield _event(event, pty)
                    if isinstance(event, ExecResult):
                        return
            finally:
                if following is not None:
                    following.cancel()
                    await asyncio.gather(following, return_exceptions=True)

    # -- unary --------------------------------------------------------------------------

    async def list(self, request: pb.ListRequest, ctx: Ctx) -> pb.ListResponse:
        call = current_call()
        running = await self._manager.commands.processes(call.team, call.sandbox_id)
        processes = []
        for info in running:
            launch = self._launches.get((call.sandbox_id, info.pid))
            if launch is not None:
                config = pb.ProcessConfig(cmd=launch.cmd, args=launch.args, envs=launch.envs)
                if launch.cwd is not None:
                    config.cwd = launch.cwd
                tag = launch.tag
            else:  # started outside E2B: its argv, or its shell line
                argv = info.argv or ["/bin/sh", "-c", info.cmd or ""]
                config = pb.ProcessConfig(cmd=argv[0], args=argv[1:])
                tag = info.tag
            process = pb.ProcessInfo(config=config, pid=info.pid)
            if tag is not None:
                process.tag = tag
            processes.append(process)
        return pb.ListResponse(processes=processes)

    async def send_input(self, request: pb.SendInputRequest, ctx: Ctx) -> pb.SendInputResponse:
        call = current_call()
        pid = await self._pid(call, request.process)
        await self._write(call, pid, request.input)
        return pb.SendInputResponse()

    async def stream_input(
        self, request: AsyncIterator[pb.StreamInputRequest], ctx: Ctx
    ) -> pb.StreamInputResponse:
        call = current_call()
        pid: int | None = None
        async for message in request:
            kind = message.WhichOneof("event")
            if kind == "start":
                pid = await self._pid(call, message.start.process)
            elif kind == "data":
                if pid is None:
                    raise InvalidRequest("send a start event naming the process before data")
                await self._write(call, pid, message.data.input)
        return pb.StreamInputResponse()

    async def close_stdin(self, request: pb.CloseStdinRequest, ctx: Ctx) -> pb.CloseStdinResponse:
        call = current_call()
        pid = await self._pid(call, request.process)
        self._check_stdin(call, pid)
        await self._manager.commands.close_input(call.team, call.sandbox_id, pid)
        return pb.CloseStdinResponse()

    async def send_signal(self, request: pb.SendSignalRequest, ctx: Ctx) -> pb.SendSignalResponse:
        call = current_call()
        signum = _SIGNALS.get(request.signal)
        if signum is None:
            raise InvalidRequest("signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM")
        pid = await self._pid(call, request.process)
        try:  # the whole group: a shell's children go with it
            await self._manager.commands.signal(call.team, call.sandbox_id, pid, signum, group=True)
        except CommandError:  # the agent refuses a pid it does not run
            raise _no_process(pid) from None
        if signum == signal.SIGKILL:
            await self._reaped(call, pid)
        return pb.SendSignalResponse()

    async def update(self, request: pb.UpdateRequest, ctx: Ctx) -> pb.UpdateResponse:
        call = current_call()
        pid = await self._pid(call, request.process)
        if request.HasField("pty"):
            size = _pty_size(request.pty)
            await self._manager.commands.resize(
                call.team, call.sandbox_id, pid, size.cols, size.rows
            )
        return pb.UpdateResponse()

    # -- helpers ------------------------------------------------------------------------

    async def _reaped(self, call: EnvdCall, pid: int) -> None:
        """Return once the agent no longer runs `pid` (or after _REAP_SECONDS)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _REAP_SECONDS
        while loop.time() < deadline:
            try:
                running = await self._manager.commands.processes(call.team, call.sandbox_id)
            except (SandboxNotRunning, NotFound):
                return  # the sandbox ended: nothing of it runs
            if all(process.pid != pid for process in running):
                return
            await asyncio.sleep(0.01)

    async def _gone(self, call: EnvdCall) -> bool:
        """Whether the call's sandbox has ended (killed, timed out) or is paused."""
        try:
            await self._manager.running(call.team, call.sandbox_id)
        except (SandboxNotRunning, NotFound):
            return True
        return False

    async def _pid(self, call: EnvdCall, selector: pb.ProcessSelector) -> int:
        """The pid a selector names: its pid, or the running process with its tag."""
        kind = selector.WhichOneof("selector")
        if kind == "pid":
            if selector.pid <= 0:
                raise InvalidRequest(f"pid={selector.pid} is not a process id")
            return selector.pid
        if kind == "tag":
            running = await self._manager.commands.processes(call.team, call.sandbox_id)
            for info in running:
                launch = self._launches.get((call.sandbox_id, info.pid))
                if (launch.tag if launch is not None else info.tag) == selector.tag:
                    return info.pid
            raise NotFound(f"no running process has the tag {selector.tag!r}")
        raise InvalidRequest("process names no process: pass a pid or a tag")

    def _forget_ended(self) -> None:
        """Drop the launches of sandboxes that have ended (their streams may not have
        seen their processes end)."""
        manager = self._manager
        for key in [k for k in self._launches if manager.live_state(k[0]) is None]:
            del self._launches[key]

    def _check_stdin(self, call: EnvdCall, pid: int) -> None:
        launch = self._launches.get((call.sandbox_id, pid))
        if launch is not None and not launch.stdin:
            raise CommandError(
                f"process {pid} was started without stdin (stdin false): start it with "
                "stdin true to send it input"
            )

    async def _write(self, call: EnvdCall, pid: int, data: pb.ProcessInput) -> None:
        kind = data.WhichOneof("input")
        if kind is None:
            raise InvalidRequest("input is empty: pass stdin or pty bytes")
        payload: bytes = getattr(data, kind)
        self._check_stdin(call, pid)
        if payload:
            await self._manager.commands.send_input(call.team, call.sandbox_id, pid, payload)


def _no_process(pid: int) -> NotFound:
    return NotFound(f"no process {pid} is running in this sandbox; list them with List")
