"""The host side of the guest protocol: one `GuestConnection` per sandbox agent.

Every call opens a channel on the connection, so any number of commands, uploads and
downloads share one byte stream. Output reaches the caller with back-pressure: credit
goes back to the agent only as the caller consumes chunks, so a caller that stops
reading stops the command (it blocks on its own write) instead of filling memory.

The agent's error replies become `corral.errors` here, in `_error_for`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from corral._aio import stop_tasks
from corral.errors import (
    CommandError,
    CorralError,
    DirectoryNotEmpty,
    FileExists,
    FileNotFound,
    GuestError,
    InvalidRequest,
    IsADirectory,
    NoSpace,
    NotADirectory,
    PermissionDenied,
    SandboxNotRunning,
)
from corral.guest import protocol

# How long `aclose` waits for the agent's stream to end before giving up on it.
_CLOSE_GRACE = 1.0
# Unread EVENT/REPLY bytes one channel may hold before the agent is deemed broken.
_MAX_BACKLOG = 16 * 1024 * 1024
# Grant credit back in batches: one CREDIT frame per this many consumed bytes.
_CREDIT_BATCH = protocol.CHUNK
# How a sandbox's end kills its commands (with the agent, pid 1 of their namespace).
_SIGKILL = 9


@dataclass(frozen=True)
class ExecResult:
    """How a command ended.

    `reason` is "exited", "killed" (by a signal), "timeout" or "output_limit" (the agent
    killed it); `exit_code` is 128 + signal when a signal ended it.
    """

    exit_code: int
    signal: int | None
    reason: str
    output_bytes: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.reason == "exited"


@dataclass(frozen=True)
class OutputChunk:
    """Bytes a command wrote, in the order the agent read them."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class EntryInfo:
    """One file, directory or symlink in the sandbox (lstat: symlinks are not followed)."""

    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    mtime: float
    symlink_target: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A process the agent started that is still running."""

    pid: int
    argv: list[str] | None
    cmd: str | None
    tag: str | None
    background: bool
    started_at: float


_ERRORS: dict[str, type[CorralError]] = {
    "not_found": FileNotFound,
    "exists": FileExists,
    "not_a_directory": NotADirectory,
    "is_a_directory": IsADirectory,
    "permission_denied": PermissionDenied,
    "not_empty": DirectoryNotEmpty,
    "no_space": NoSpace,
    "invalid_argument": InvalidRequest,
    "not_running": CommandError,
}


def _error_for(op: str, reply: Mapping[str, Any]) -> CorralError:
    """The one translation from the agent's error replies to Corral's errors."""
    error = reply.get("error")
    if not isinstance(error, dict):
        return GuestError(f"the guest agent answered {op} with a malformed error: {reply!r}")
    kind = error.get("type")
    message = str(error.get("message") or f"{op} failed ({kind})")
    if kind == "unsupported":
        if error.get("unknown_op") is not None:  # not the caller's doing: the versions differ
            return GuestError(f"{message}; the agent is older than this client")
        return InvalidRequest(message)  # a request this agent does not do: the caller's
    if op == "exec":  # a bad cwd, user or environment: the command could not start
        return CommandError(message)
    return _ERRORS.get(str(kind), GuestError)(message)


def _entry(value: Any) -> EntryInfo:
    target = value.get("symlink_target")
    return EntryInfo(
        name=str(value["name"]),
        path=str(value["path"]),
        type=value["type"],
        size=int(value["size"]),
        mode=int(value["mode"]),
        mtime=float(value["mtime"]),
        symlink_target=None if target is None else str(target),
    )


class _ChannelEnded(Exception):
    """The agent closed the channel (its REPLY is in the inbox) while we were sending."""


class _Channel:
    """One open call: its inbox of frames and both directions of credit."""

    def __init__(self, connection: GuestConnection, number: int) -> None:
        self.connection = connection
        self.number = number
        self.inbox: deque[tuple[int, bytes]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.failure: CorralError | None = None
        self.open = True  # until the REPLY arrives or we CLOSE it
        self.send_credit = protocol.WINDOW
        self.credit_waiter: asyncio.Future[None] | None = None
        self.unacked = 0
        # OUT/ERR bytes the agent may still send: an agent that ignores its credit (a
        # hijacked one, say) is cut off instead of growing the host's memory.
        self.receive_allowance = protocol.WINDOW
        # Other frames not yet taken by the caller; bounded for the same reason.
        self.backlog = 0

    def deliver(self, kind: int, payload: bytes) -> None:
        if kind == protocol.CREDIT:
            self.send_credit += protocol.decode_credit(payload)
            _wake(self.credit_waiter)
            return
        if kind in (protocol.OUT, protocol.ERR):
            self.receive_allowance -= len(payload)
            if self.receive_allowance < 0:
                raise protocol.ProtocolError(f"channel {self.number}: output beyond its credit")
        else:
            self.backlog += len(payload) + protocol.HEADER_SIZE
            if self.backlog > _MAX_BACKLOG:
                raise protocol.ProtocolError(f"channel {self.number}: unread frames pile up")
        self.inbox.append((kind, payload))
        if kind == protocol.REPLY:
            self.open = False
            _wake(self.credit_waiter)
        _wake(self.waiter)

    def fail(self, failure: CorralError) -> None:
        """Nothing more will arrive: raise `failure` once the inbox is empty."""
        self.open = False
        if self.failure is None:
            self.failure = failure
        _wake(self.waiter)
        _wake(self.credit_waiter)

    def raise_failure(self) -> None:
        if self.failure is not None:
            raise type(self.failure)(str(self.failure))

    async def next(self) -> tuple[int, bytes]:
        while not self.inbox:
            self.raise_failure()
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        kind, payload = self.inbox.popleft()
        if kind not in (protocol.OUT, protocol.ERR):
            self.backlog -= len(payload) + protocol.HEADER_SIZE
        return kind, payload

    async def reply(self, op: str) -> dict[str, Any]:
        """Wait for the REPLY (skipping anything else) and raise the error it carries."""
        while True:
            kind, payload = await self.next()
            if kind == protocol.REPLY:
                return self.connection._check_reply(op, payload)

    def consumed(self, amount: int) -> None:
        """The caller took `amount` bytes of OUT/ERR: let the agent send that much more."""
        self.unacked += amount
        if self.unacked >= _CREDIT_BATCH and self.open:
            self.connection._send_nowait(
                protocol.CREDIT, self.number, protocol.encode_credit(self.unacked)
            )
            self.receive_allowance += self.unacked
            self.unacked = 0

    async def take_credit(self, wanted: int) -> int:
        """Wait until the agent lets us send IN bytes; return how many (<= wanted)."""
        while self.open and self.send_credit <= 0:
            self.credit_waiter = asyncio.get_running_loop().create_future()
            try:
                await self.credit_waiter
            finally:
                self.credit_waiter = None
        if not self.open:
            self.raise_failure()  # the connection died, or we detached
            raise _ChannelEnded
        granted = min(wanted, self.send_credit)
        self.send_credit -= granted
        return granted

    async def send_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            size = await self.take_credit(min(len(view), protocol.CHUNK))
            self.connection._send_nowait(protocol.IN, self.number, bytes(view[:size]))
            view = view[size:]
            await self.connection._drain()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class CommandOutput(ABC):
    """A running command's output, pulled one chunk at a time: iterate it, or `collect`
    it all with the result. Subclasses say how the next chunk and the result come."""

    @abstractmethod
    async def _next_chunk(self) -> OutputChunk | None:
        """The next chunk not yet read, or None once the command's output has ended."""

    @abstractmethod
    async def wait(self) -> ExecResult:
        """Wait for the end, discarding output nobody read."""

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[OutputChunk]:
        while (chunk := await self._next_chunk()) is not None:
            yield chunk

    async def collect(self) -> tuple[bytes, bytes, ExecResult]:
        """Wait for the end and return (stdout, stderr, result) not yet iterated."""
        stdout, stderr = bytearray(), bytearray()
        while (chunk := await self._next_chunk()) is not None:
            (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
        return bytes(stdout), bytes(stderr), await self.wait()


class GuestProcess(CommandOutput):
    """A command started by the agent: its output, its stdin, signals and its result.

    `pid` is the process id inside the sandbox, or 0 when the program could not be
    started (not found, not executable): its result then says so with exit code 127/126.
    """

    def __init__(self, connection: GuestConnection, channel: _Channel, pid: int) -> None:
        self.pid = pid
        self._connection = connection
        self._channel = channel
        self._result: ExecResult | None = None
        self._output_bytes = 0

    async def _next_chunk(self) -> OutputChunk | None:
        while self._result is None:
            try:
                kind, payload = await self._channel.next()
            except SandboxNotRunning as exc:  # see `GuestConnection.abort`
                self._result = ExecResult(
                    128 + _SIGKILL, _SIGKILL, "killed", self._output_bytes, str(exc)
                )
                return None
            if kind == protocol.OUT or kind == protocol.ERR:
                self._channel.consumed(len(payload))
                self._output_bytes += len(payload)
                return OutputChunk("stdout" if kind == protocol.OUT else "stderr", payload)
            if kind == protocol.REPLY:
                reply = self._connection._check_reply("exec", payload)
                error = reply.get("error")
                self._result = ExecResult(
                    exit_code=int(reply["exit_code"]),
                    signal=None if reply.get("signal") is None else int(reply["signal"]),
                    reason=str(reply["reason"]),
                    output_bytes=int(reply.get("output_bytes", 0)),
                    error=None if error is None else str(error),
                )
        return None

    async def wait(self) -> ExecResult:
        """Wait for the end, discarding output nobody read."""
        while await self._next_chunk() is not None:
            pass
        assert self._result is not None
        return self._result

    async def write_stdin(self, data: bytes) -> None:
        """Send bytes to the command's stdin (exec with stdin=True); waits for credit."""
        try:
            await self._channel.send_data(data)
        except _ChannelEnded:
            raise CommandError(f"process {self.pid} has ended; it reads no more stdin") from None

    async def close_stdin(self) -> None:
        if self._channel.open:
            self._connection._send_nowait(protocol.EOF, self._channel.number)
            await self._connection._drain()

    async def signal(self, signum: int, *, group: bool = False) -> None:
        await self._connection.signal(self.pid, signum, group=group)

    async def kill(self) -> None:
        """SIGKILL the command and every process in its group."""
        await self.signal(9, group=True)

    async def detach(self) -> None:
        """Stop listening. A foreground command is killed; a background one goes on."""
        self._connection._close_channel(
            self._channel,
            InvalidRequest(f"process {self.pid} was detached; attach({self.pid}) to follow it"),
        )


class GuestConnection:
    """A connection to one guest agent over a byte stream (its stdin and stdout)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._channels: dict[int, _Channel] = {}
        self._next_number = 1
        self._failure: CorralError | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._failure is not None

    async def start(self) -> None:
        """Start reading the agent's frames."""
        self._task = asyncio.create_task(self._read_frames(), name="corral-guest-reader")

    async def aclose(self) -> None:
        """Close the stream (the agent exits) and fail every call still waiting."""
        self._fail(GuestError("the guest connection was closed"))
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        if self._task is not None:
            # The reader drains until the agent's stream ends (it exits on our EOF);
            # cancelling it earlier would leave the pipe paused and the process unreaped.
            try:
                await asyncio.wait_for(asyncio.shield(self._task), _CLOSE_GRACE)
            except TimeoutError:
                await stop_tasks(self._task)

    # -- frames -----------------------------------------------------------------------

    async def _read_frames(self) -> None:
        reader = self._reader
        try:
            while True:
                header = await reader.readexactly(protocol.HEADER_SIZE)
                length, kind, number = protocol.unpack_header(header)
                size = protocol.check_header(length, kind)
                payload = await reader.readexactly(size) if size else b""
                if kind in (protocol.CALL, protocol.IN, protocol.EOF, protocol.CLOSE):
                    raise protocol.ProtocolError(f"the agent sent a {protocol.KIND_NAMES[kind]}")
                channel = self._channels.get(number)
                if channel is not None:  # else a channel we closed: drop what was in flight
                    channel.deliver(kind, payload)
                    if kind == protocol.REPLY:
                        del self._channels[number]
        except asyncio.IncompleteReadError:
            reason = "its output stream ended; the sandbox may be gone or out of memory"
        except (ConnectionError, OSError) as exc:
            reason = f"reading from it failed: {exc}"
        except protocol.ProtocolError as exc:
            reason = f"it broke the protocol: {exc}"
        self._fail(GuestError(f"the guest agent exited: {reason}"))
        # Keep reading (and discarding) to the end of the stream: an unread pipe would
        # block the agent and keep asyncio from ever reaping its process.
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(1 << 16):
                pass

    def abort(self, message: str) -> None:
        """The host is ending the sandbox on purpose: the agent's death that follows is
        no fault. Calls in flight and later ones fail with `SandboxNotRunning` (a caller's
        error, not an internal one), and commands end with reason "killed"."""
        self._fail(SandboxNotRunning(message))

    def _fail(self, failure: CorralError) -> None:
        if self._failure is None:
            self._failure = failure
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            channel.fail(failure)

    def _check_open(self) -> None:
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))

    def _send_nowait(self, kind: int, number: int, payload: bytes = b"") -> None:
        self._check_open()
        self._writer.write(protocol.encode_header(kind, number, len(payload)) + payload)

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._fail(GuestError(f"the guest agent exited: writing to it failed: {exc}"))
            self._check_open()

    def _check_reply(self, op: str, payload: bytes) -> dict[str, Any]:
        try:
            reply = protocol.decode_json(payload)
        except ValueError as exc:
            raise GuestError(f"the guest agent sent a malformed reply to {op}: {exc}") from None
        if not isinstance(reply, dict):
            raise GuestError(f"the guest agent sent a malformed reply to {op}: {reply!r}")
        if not reply.get("ok"):
            raise _error_for(op, reply)
        return reply

    async def _open_channel(self, op: str, args: Mapping[str, Any]) -> _Channel:
        """Send a CALL on a new channel."""
        self._check_open()
        payload = protocol.encode_json({"op": op, **args})
        if len(payload) > protocol.MAX_PAYLOAD:
            raise InvalidRequest(f"the {op} request is {len(payload)} bytes; the limit is 1 MiB")
        number = self._next_number
        while number in self._channels or number == 0:
            number = (number + 1) & 0xFFFFFFFF
        self._next_number = (number + 1) & 0xFFFFFFFF
        channel = _Channel(self, number)
        self._channels[number] = channel
        self._send_nowait(protocol.CALL, number, payload)
        await self._drain()
        return channel

    def _close_channel(self, channel: _Channel, failure: CorralError) -> None:
        """Stop listening on a channel (CLOSE); later reads from it raise `failure`."""
        if channel.open and self._failure is None:
            self._channels.pop(channel.number, None)
            self._send_nowait(protocol.CLOSE, channel.number)
        channel.fail(failure)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """One CALL and its REPLY; the raw form of every method below."""
        channel = await self._open_channel(op, args)
        return await channel.reply(op)

    # -- processes --------------------------------------------------------------------

    async def ping(self) -> dict[str, object]:
        """The agent's version, pid, uid, user and workdir."""
        return await self.request("ping")

    async def exec(
        self,
        command: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | int | None = None,
        timeout: float | None = None,
        output_limit: int | None = None,
        stdin: bool = False,
        background: bool = False,
        tag: str | None = None,
    ) -> GuestProcess:
        """Start a command: argv (a sequence) or a shell string run with /bin/sh -c."""
        args: dict[str, Any] = {}
        if isinstance(command, str):
            args["cmd"] = command
        else:
            args["argv"] = list(command)
            if not args["argv"]:
                raise InvalidRequest("the command is empty; pass a program and its arguments")
        options: dict[str, Any] = {"env": dict(env) if env else None, "cwd": cwd, "user": user}
        options.update(timeout=timeout, output_limit=output_limit, tag=tag)
        args.update((key, value) for key, value in options.items() if value is not None)
        if stdin:
            args["stdin"] = True
        if background:
            args["background"] = True
        return await self._process("exec", args)

    async def attach(self, pid: int) -> GuestProcess:
        """Follow a running background command again: its further output and its end."""
        return await self._process("attach", {"pid": pid})

    async def _process(self, op: str, args: dict[str, Any]) -> GuestProcess:
        channel = await self._open_channel(op, args)
        kind, payload = await channel.next()
        if kind == protocol.REPLY:
            self._check_reply(op, payload)
        if kind != protocol.EVENT:
            self._close_channel(channel, GuestError(f"unexpected frame for {op}"))
            raise GuestError(f"the guest agent answered {op} with {protocol.KIND_NAMES[kind]}")
        pid = protocol.decode_json(payload).get("pid")
        return GuestProcess(self, channel, int(pid or 0))

    async def signal(self, pid: int, signum: int, *, group: bool = False) -> None:
        """Send a signal to a process the agent started (to its whole group if asked)."""
        await self.request("signal", pid=pid, signal=int(signum), group=group)

    async def processes(self) -> list[ProcessInfo]:
        reply = await self.request("ps")
        return [
            ProcessInfo(
                pid=int(p["pid"]),
                argv=p.get("argv"),
                cmd=p.get("cmd"),
                tag=p.get("tag"),
                background=bool(p.get("background")),
                started_at=float(p["started_at"]),
            )
            for p in reply["processes"]
        ]

    # -- files ------------------------------------------------------------------------

    async def read_file(
        self, path: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """The content of a file, streamed in chunks of at most 64 KiB."""
        args: dict[str, Any] = {"path": path, "offset": offset}
        if length is not None:
            args["length"] = length
        channel = await self._open_channel("read", args)
        try:
            while True:
                kind, payload = await channel.next()
                if kind == protocol.OUT:
                    channel.consumed(len(payload))
                    yield payload
                elif kind == protocol.REPLY:
                    self._check_reply("read", payload)
                    return
        finally:
            if channel.open and self._failure is None:  # the caller stopped early
                self._close_channel(channel, InvalidRequest("the read was abandoned"))

    async def read_bytes(self, path: str) -> bytes:
        return b"".join([chunk async for chunk in self.read_file(path)])

    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes] | Iterable[bytes],
        *,
        mode: int = 0o644,
        append: bool = False,
    ) -> EntryInfo:
        """Write a file (creating its parents); it appears whole, on success only."""
        channel = await self._open_channel("write", {"path": path, "mode": mode, "append": append})
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                await channel.send_data(bytes(data))
            elif isinstance(data, AsyncIterable):
                async for piece in data:
                    await channel.send_data(piece)
            else:
                for piece in data:
                    await channel.send_data(piece)
            self._send_nowait(protocol.EOF, channel.number)
            await self._drain()
        except _ChannelEnded:
            pass  # the agent refused early: its reply says why
        except BaseException:
            self._close_channel(channel, InvalidRequest("the write was abandoned"))
            raise
        reply = await channel.reply("write")
        return _entry(reply["entry"])

    async def list_dir(self, path: str, *, depth: int = 1) -> list[EntryInfo]:
        """The entries under a directory, `depth` levels deep (symlinks not followed)."""
        channel = await self._open_channel("list", {"path": path, "depth": depth})
        entries: list[EntryInfo] = []
        while True:
            kind, payload = await channel.next()
            if kind == protocol.EVENT:
                entries.extend(_entry(e) for e in protocol.decode_json(payload)["entries"])
            elif kind == protocol.REPLY:
                reply = self._check_reply("list", payload)
                entries.extend(_entry(e) for e in reply["entries"])
                return entries

    async def stat(self, path: str) -> EntryInfo:
        return _entry((await self.request("stat", path=path))["entry"])

    async def make_dir(self, path: str) -> bool:
        """Create a directory and its parents; False if it already existed."""
        return bool((await self.request("mkdir", path=path))["created"])

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self.request("remove", path=path, recursive=recursive)

    async def rename(self, src: str, dst: str, *, overwrite: bool = True) -> EntryInfo | None:
        """Move `src` to `dst`; the entry now at `dst`."""
        reply = await self.request("rename", src=src, dst=dst, overwrite=overwrite)
        entry = reply.get("entry")
        return None if entry is None else _entry(entry)
