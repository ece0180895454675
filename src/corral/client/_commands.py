"""Commands in a sandbox (async): run to the end, or start in the background with a handle.

Output arrives as it is produced; `on_stdout`/`on_stderr` get each whole line decoded as
UTF-8, without its newline, so `on_stdout=print` prints the output once (the last line
comes at the end even without a newline). With `raw_output=True` they get each chunk as
it arrives, newlines kept, to write through as it comes (a character split across
chunks is kept whole either way). A background command's output is
read continuously, so it never blocks on a full pipe whether or not anyone waits.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import signal
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Literal, TypedDict, TypeVar, Unpack, overload

from corral._aio import stop_tasks
from corral.client._connection import Connection
from corral.client._input import Input, chunks
from corral.client._models import CommandResult, ProcessInfo
from corral.errors import InvalidRequest, NotFound, ServerUnavailable
from corral.v1 import sandbox_pb2 as pb

T = TypeVar("T")
OutputCallback = Callable[[str], object]
DataCallback = Callable[[bytes], object]  # a terminal's output, as it comes
DEFAULT_TIMEOUT = 60.0


class RunOptions(TypedDict, total=False):
    """How to run a command; every key is optional."""

    envs: Mapping[str, str]  # on top of the sandbox's own
    cwd: str  # default /workspace
    # Who runs it: "root", "user" or a user of the sandbox's template; default the
    # template's user. Users other than "user" need a server that runs as root.
    user: str
    # Seconds before it is killed with reason "timeout"; default 60, None or 0 for none.
    timeout: float | None
    on_stdout: OutputCallback  # called with each line of output, without its newline
    on_stderr: OutputCallback
    # The callbacks get each chunk as it arrives, newlines kept (to write it through).
    raw_output: bool
    # Open stdin for send_stdin; default: in the background only.
    stdin: bool
    # In the foreground: fed to stdin in chunks, then stdin is closed (bytes, text, an
    # iterable of byte chunks read on a thread of its own, or an async iterable); None: none.
    input: Input | None
    tag: str  # shown by `commands.list()`


class _Output:
    """One stream's text so far, decoded incrementally, and its callback (given lines,
    or chunks when `raw`)."""

    def __init__(self, callback: OutputCallback | None, *, raw: bool = False) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []
        self._callback = callback
        self._raw = raw
        self._line = ""  # the start of a line whose newline has not come yet

    async def add(self, data: bytes, final: bool = False) -> None:
        text = self._decoder.decode(data, final)
        if text:
            self._parts.append(text)
        if self._callback is None:
            return
        if self._raw:
            if text:
                await self._call(text)
            return
        *lines, self._line = (self._line + text).split("\n")
        if final and self._line:
            lines.append(self._line)
            self._line = ""
        for line in lines:
            await self._call(line)

    async def _call(self, text: str) -> None:
        assert self._callback is not None
        await _call(self._callback, text)

    @property
    def text(self) -> str:
        return "".join(self._parts)


async def _call(callback: Callable[[T], object], value: T) -> None:
    """Call a user's callback, plain or async."""
    result = callback(value)
    if inspect.isawaitable(result):
        await result


def _seen(task: asyncio.Task[CommandResult]) -> None:
    """A background reader's failure is raised by `wait`, if anyone waits: not logged."""
    if not task.cancelled():
        task.exception()


class AsyncCommandHandle:
    """A started command: its pid, stdin, signals, and its result when it ends."""

    def __init__(
        self,
        connection: Connection,
        sandbox_id: str,
        pid: int,
        events: AsyncGenerator[pb.ExecResponse, None],
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        raw_output: bool = False,
        on_data: DataCallback | None = None,
    ) -> None:
        self.pid = pid
        self.sandbox_id = sandbox_id
        self._connection = connection
        self._events = events
        self._stdout = _Output(on_stdout, raw=raw_output)
        self._stderr = _Output(on_stderr, raw=raw_output)
        self._on_data = on_data
        self._reader: asyncio.Task[CommandResult] | None = None

    @property
    def stdout(self) -> str:
        """What the command wrote to stdout so far."""
        return self._stdout.text

    @property
    def stderr(self) -> str:
        return self._stderr.text

    async def _read_to_end(self) -> CommandResult:
        # The stream is read to its own end (the server closes it after the "end" event),
        # so the HTTP response completes; it is closed here, in the reading task, when the
        # reading stops early (an error, a cancel at exit). A stream left open was closed
        # later by the loop, out of its task: "error occurred during closing of
        # asynchronous generator" at exit.
        result: CommandResult | None = None
        async with contextlib.aclosing(self._events) as events:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "stdout":
                    await self._stdout.add(event.stdout)
                    if self._on_data is not None:
                        await _call(self._on_data, event.stdout)
                elif kind == "stderr":
                    await self._stderr.add(event.stderr)
                elif kind == "end":
                    await self._stdout.add(b"", final=True)
                    await self._stderr.add(b"", final=True)
                    end = event.end
                    result = CommandResult(
                        stdout=self._stdout.text,
                        stderr=self._stderr.text,
                        exit_code=end.exit_code,
                        reason=end.reason,
                        error=end.error or None,
                        signal=end.signal or None,
                    )
        if result is None:
            raise ServerUnavailable(
                f"the Corral server ended the output of process {self.pid} before it ended; "
                "`corral sandbox ps` shows whether it still runs"
            )
        return result

    def _read_in_background(self) -> None:
        self._reader = asyncio.create_task(self._read_to_end(), name=f"corral-pid-{self.pid}")
        self._reader.add_done_callback(_seen)
        self._connection.follow(self._reader)

    async def wait(self) -> CommandResult:
        """Wait for the end; a non-zero exit code is a result, not an error."""
        if self._reader is None:
            return await self._read_to_end()
        if self._reader.cancelled():
            raise InvalidRequest(
                f"process {self.pid} is no longer followed (its sandbox's connection was "
                "closed, or `disconnect` was called): it may still run; connect to the "
                "sandbox again and check `commands.list()`"
            )
        return await asyncio.shield(self._reader)

    async def _feed(self, source: Input) -> None:
        async with contextlib.aclosing(chunks(source)) as stream:
            async for chunk in stream:
                await self.send_stdin(chunk)
        await self.close_stdin()

    async def _wait_feeding(self, source: Input) -> CommandResult:
        """Wait for the end while `source` goes to stdin; a command that ends without
        reading it all ends this too (the rest is not read)."""
        reader = asyncio.ensure_future(self._read_to_end())
        feeder = asyncio.ensure_future(self._feed(source))
        try:
            await asyncio.wait({reader, feeder}, return_when=asyncio.FIRST_COMPLETED)
            failure = feeder.exception() if feeder.done() else None
            # NotFound: the server no longer has the command, so its end is on the way.
            if failure is not None and not reader.done() and not isinstance(failure, NotFound):
                # Its input cannot be delivered: do not leave it waiting for the rest.
                with contextlib.suppress(Exception):
                    await self.signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await reader
                raise failure
            return await reader
        finally:
            await stop_tasks(reader)
            # Once the command has ended its input no longer matters: a send in flight as
            # the cancel lands may still fail (NotFound: the command is gone), unheard.
            feeder.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await feeder

    async def send_stdin(self, data: str | bytes) -> None:
        """Write to the command's stdin (started with stdin=True, the default in background)."""
        raw = data.encode() if isinstance(data, str) else data
        request = pb.SendInputRequest(sandbox_id=self.sandbox_id, pid=self.pid, data=raw)
        await self._connection.call(self._connection.rpc.send_input, request)

    async def close_stdin(self) -> None:
        request = pb.CloseInputRequest(sandbox_id=self.sandbox_id, pid=self.pid)
        await self._connection.call(self._connection.rpc.close_input, request)

    async def signal(self, signum: int, *, group: bool = True) -> None:
        request = pb.SignalRequest(
            sandbox_id=self.sandbox_id, pid=self.pid, signal=signum, group=group
        )
        await self._connection.call(self._connection.rpc.signal, request)

    async def kill(self) -> CommandResult:
        """SIGKILL the command and its process group; its result (reason "killed")."""
        await self.signal(signal.SIGKILL)
        return await self.wait()

    async def disconnect(self) -> None:
        """Stop following the command: a background one goes on running in the sandbox."""
        await stop_tasks(self._reader)
        aclose = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()


class AsyncCommands:
    """`sandbox.commands`: run commands and manage the running ones."""

    def __init__(self, connection: Connection, sandbox_id: str) -> None:
        self._connection = connection
        self._sandbox_id = sandbox_id

    @overload
    async def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        **options: Unpack[RunOptions],
    ) -> CommandResult: ...

    @overload
    async def run(
        self, cmd: str | Sequence[str], *, background: Literal[True], **options: Unpack[RunOptions]
    ) -> AsyncCommandHandle: ...

    async def run(
        self, cmd: str | Sequence[str], *, background: bool = False, **options: Unpack[RunOptions]
    ) -> CommandResult | AsyncCommandHandle:
        """Run `cmd` (a shell line, or a program and its arguments); see `RunOptions`.

        In the foreground, returns its `CommandResult` when it ends. With
        `background=True`, returns a handle at once; the command goes on if this client
        goes away.
        """
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        stdin = options.get("stdin")
        source = options.get("input")
        if source is not None:
            if background:
                raise InvalidRequest(
                    "input= is for a command in the foreground; in the background, "
                    "pass stdin=True and call send_stdin and close_stdin on its handle"
                )
            stdin = True
        request = pb.ExecRequest(
            sandbox_id=self._sandbox_id,
            envs=dict(options.get("envs") or {}),
            cwd=options.get("cwd") or "",
            user=options.get("user") or "",
            timeout_seconds=timeout or 0.0,
            stdin=background if stdin is None else stdin,
            background=background,
            tag=options.get("tag") or "",
        )
        if isinstance(cmd, str):
            request.cmd = cmd
        else:
            request.argv.extend(cmd)
        handle = await open_handle(
            self._connection,
            self._sandbox_id,
            self._connection.stream(self._connection.rpc.exec, request),
            on_stdout=options.get("on_stdout"),
            on_stderr=options.get("on_stderr"),
            raw_output=options.get("raw_output", False),
        )
        if not background:
            if source is not None:
                return await handle._wait_feeding(source)
            return await handle.wait()
        handle._read_in_background()
        return handle

    async def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        raw_output: bool = False,
    ) -> AsyncCommandHandle:
        """Follow a running command (started by anyone): its output from now on and its
        end. `disconnect` stops following it and leaves it running."""
        request = pb.AttachRequest(sandbox_id=self._sandbox_id, pid=pid)
        handle = await open_handle(
            self._connection,
            self._sandbox_id,
            self._connection.stream(self._connection.rpc.attach, request),
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            raw_output=raw_output,
        )
        handle._read_in_background()
        return handle

    async def list(self) -> list[ProcessInfo]:
        """The processes started in the sandbox that still run."""
        request = pb.ListProcessesRequest(sandbox_id=self._sandbox_id)
        reply = await self._connection.call(self._connection.rpc.list_processes, request)
        return [ProcessInfo.from_proto(p) for p in reply.processes]

    async def kill(self, pid: int) -> None:
        """SIGKILL a process (and its group) by pid."""
        request = pb.SignalRequest(
            sandbox_id=self._sandbox_id, pid=pid, signal=signal.SIGKILL, group=True
        )
        await self._connection.call(self._connection.rpc.signal, request)

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        """Write to the stdin of a running command by pid, followed or not."""
        raw = data.encode() if isinstance(data, str) else data
        request = pb.SendInputRequest(sandbox_id=self._sandbox_id, pid=pid, data=raw)
        await self._connection.call(self._connection.rpc.send_input, request)

    async def close_stdin(self, pid: int) -> None:
        """End the stdin of a running command by pid (it reads what was sent first)."""
        request = pb.CloseInputRequest(sandbox_id=self._sandbox_id, pid=pid)
        await self._connection.call(self._connection.rpc.close_input, request)


async def open_handle(
    connection: Connection,
    sandbox_id: str,
    events: AsyncGenerator[pb.ExecResponse, None],
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
    raw_output: bool = False,
    on_data: DataCallback | None = None,
) -> AsyncCommandHandle:
    """The handle on the command an Exec or Attach stream follows, once it has started."""
    try:
        first = await anext(events, None)
    except BaseException:
        await events.aclose()
        raise
    if first is None or first.WhichOneof("event") != "start":
        await events.aclose()
        raise ServerUnavailable("the Corral server did not start the command; try again")
    return AsyncCommandHandle(
        connection, sandbox_id, first.start.pid, events, on_stdout, on_stderr, raw_output, on_data
    )
