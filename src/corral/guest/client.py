"""The host side of the guest protocol: one `GuestConnection` per sandbox agent.

`GuestConnection` is the typed calls (exec, files, processes) and what they return; the
channels they run on, their back-pressure and the translation of the agent's errors into
`corral.errors` are in `multiplex`.
"""

from __future__ import annotations

import asyncio
import binascii
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from corral import tracing
from corral._aio import stop_tasks
from corral.errors import CommandError, GuestError, InvalidRequest, SandboxNotRunning
from corral.guest import protocol
from corral.guest.multiplex import Channel, ChannelEnded, Multiplexer
from corral.terminal import PtySize

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


FileKind = Literal["file", "dir", "symlink", "other"]


@dataclass(frozen=True)
class EntryInfo:
    """One file, directory or symlink in the sandbox (lstat: symlinks are not followed).

    `owner` and `group` are names in the sandbox ("" from an older agent); `metadata` is
    the file's ``user.e2b.*`` extended attributes (E2B's file metadata), prefix left out.
    A symlink has its raw `symlink_target`, the absolute path it `resolved` to and that
    path's type (None when it dangles).
    """

    name: str
    path: str
    type: FileKind
    size: int
    mode: int
    mtime: float
    symlink_target: str | None = None
    owner: str = ""
    group: str = ""
    metadata: dict[str, str] | None = None
    resolved: str | None = None
    resolved_type: FileKind | None = None


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched directory: `name` relative to it, `type` one of create,
    write, remove, rename, chmod; `entry` when asked for and the path still exists."""

    name: str
    type: str
    entry: EntryInfo | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """A process the agent started that is still running (`envs`: those its exec set)."""

    pid: int
    argv: list[str] | None
    cmd: str | None
    tag: str | None
    background: bool
    started_at: float
    cwd: str | None = None
    envs: dict[str, str] | None = None
    pty: bool = False


def _entry(value: Any) -> EntryInfo:
    target = value.get("symlink_target")
    metadata = value.get("metadata")
    resolved = value.get("resolved")
    return EntryInfo(
        name=str(value["name"]),
        path=str(value["path"]),
        type=value["type"],
        size=int(value["size"]),
        mode=int(value["mode"]),
        mtime=float(value["mtime"]),
        symlink_target=None if target is None else str(target),
        owner=str(value.get("owner") or ""),
        group=str(value.get("group") or ""),
        metadata={str(k): str(v) for k, v in metadata.items()} if metadata else None,
        resolved=None if resolved is None else str(resolved),
        resolved_type=value.get("resolved_type"),
    )


def _acting(user: str | None, home: bool) -> dict[str, Any]:
    """The arguments that make a file call act as `user` (None: the default user) and
    resolve relative paths from that user's home (`home`) instead of the workdir."""
    args: dict[str, Any] = {}
    if user is not None:
        args["user"] = user
    if home:
        args["home"] = True
    return args


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

    def __init__(self, connection: GuestConnection, channel: Channel, pid: int) -> None:
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
        except ChannelEnded:
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


class GuestStream:
    """A TCP connection the agent made to a port inside the sandbox (`connect`): what the
    peer sends (`read`, b"" at its end) and what it is sent (`write`, `write_eof`)."""

    def __init__(self, connection: GuestConnection, channel: Channel) -> None:
        self._connection = connection
        self._channel = channel
        self._ended = False

    async def read(self) -> bytes:
        while not self._ended:
            kind, payload = await self._channel.next()
            if kind == protocol.OUT:
                self._channel.consumed(len(payload))
                return payload
            if kind == protocol.REPLY:
                self._ended = True
                self._connection._check_reply("connect", payload)
        return b""

    async def write(self, data: bytes) -> None:
        try:
            await self._channel.send_data(data)
        except ChannelEnded:
            raise ConnectionResetError("the peer in the sandbox closed the connection") from None

    async def write_eof(self) -> None:
        if self._channel.open:
            self._connection._send_nowait(protocol.EOF, self._channel.number)
            await self._connection._drain()

    def close(self) -> None:
        """End the connection (the agent closes its socket) unless it has ended."""
        self._connection._close_channel(
            self._channel, SandboxNotRunning("the connection into the sandbox was closed")
        )


class GuestWatch:
    """A directory being watched (`GuestConnection.watch`): its events as they come.

    A task takes the agent's events as they arrive and keeps the newest `MAX_PENDING`
    not yet taken (older ones are dropped), so a watch nobody reads costs bounded memory.
    """

    MAX_PENDING = 10_000

    def __init__(self, connection: GuestConnection, channel: Channel) -> None:
        self._connection = connection
        self._channel = channel
        self._pending: deque[WatchEvent] = deque(maxlen=self.MAX_PENDING)
        self._arrived = asyncio.Event()
        self._failure: BaseException | None = None
        self._task = asyncio.create_task(self._pump(), name="corral-guest-watch")

    async def _pump(self) -> None:
        try:
            while True:
                self._take(*await self._channel.next())
        except Exception as exc:  # the connection ended, or the watch was closed
            self._failure = exc
            self._arrived.set()

    def _take(self, kind: int, payload: bytes) -> None:
        if kind == protocol.REPLY:
            self._connection._check_reply("watch", payload)
            raise GuestError("the guest agent ended a watch")
        if kind != protocol.EVENT:
            return
        for event in protocol.decode_json(payload).get("events", ()):
            if event.get("type") == "overflow":
                continue  # the kernel's queue overflowed: those events are lost
            entry = event.get("entry")
            entry_info = None if entry is None else _entry(entry)
            self._pending.append(WatchEvent(str(event["name"]), str(event["type"]), entry_info))
        self._arrived.set()

    @property
    def ended(self) -> bool:
        """The watch ended (closed, or its sandbox's agent is gone): no more events."""
        return self._failure is not None

    def take(self) -> list[WatchEvent]:
        """The events that arrived and were not taken yet (waits for nothing)."""
        while (frame := self._channel.take_nowait()) is not None:
            self._take(*frame)
        events = list(self._pending)
        self._pending.clear()
        self._arrived.clear()
        return events

    async def wait(self) -> list[WatchEvent]:
        """The next events: wait until there are some; raise once the watch has ended."""
        while True:
            if events := self.take():
                return events
            if self._failure is not None:
                raise self._failure
            await self._arrived.wait()

    async def aclose(self) -> None:
        self._connection._close_channel(self._channel, InvalidRequest("the watch was closed"))
        await stop_tasks(self._task)


class GuestConnection(Multiplexer):
    """A connection to one guest agent over a byte stream (its stdin and stdout)."""

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
        home: bool = False,
        timeout: float | None = None,
        output_limit: int | None = None,
        stdin: bool = False,
        background: bool = False,
        tag: str | None = None,
        pty: PtySize | None = None,
    ) -> GuestProcess:
        """Start a command: argv (a sequence) or a shell string run with /bin/sh -c; on a
        terminal of that size with `pty` (it then always takes input)."""
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
        if home:
            args["home"] = True
        if stdin:
            args["stdin"] = True
        if background:
            args["background"] = True
        if pty is not None:
            args["pty"] = {"cols": pty.cols, "rows": pty.rows}
        return await self._process("exec", args)

    async def attach(self, pid: int) -> GuestProcess:
        """Follow a running background command again: its further output and its end."""
        return await self._process("attach", {"pid": pid})

    async def _process(self, op: str, args: dict[str, Any]) -> GuestProcess:
        with tracing.span(f"agent.{op}"):  # until the agent said it started (its pid)
            channel = await self._open_channel(op, args)
            kind, payload = await channel.next()
            if kind == protocol.REPLY:
                self._check_reply(op, payload)
            if kind != protocol.EVENT:
                self._close_channel(channel, GuestError(f"unexpected frame for {op}"))
                raise GuestError(f"the guest agent answered {op} with {protocol.KIND_NAMES[kind]}")
            pid = protocol.decode_json(payload).get("pid")
            tracing.annotate({"corral.exec.pid": pid})
            return GuestProcess(self, channel, int(pid or 0))

    async def signal(self, pid: int, signum: int, *, group: bool = False) -> None:
        """Send a signal to a process the agent started (to its whole group if asked)."""
        await self.request("signal", pid=pid, signal=int(signum), group=group)

    async def write_input(self, pid: int, data: bytes) -> None:
        """Write to the stdin of a running command (started with stdin or a pty), whether
        or not a channel follows it; returns once the command's pipe took the bytes."""
        for start in range(0, len(data), protocol.CHUNK):
            piece = binascii.b2a_base64(data[start : start + protocol.CHUNK], newline=False)
            await self.request("input", pid=pid, data=piece.decode())

    async def close_input(self, pid: int) -> None:
        """End the stdin of a running command, once what was written to it is read."""
        await self.request("input", pid=pid, close=True)

    async def resize(self, pid: int, size: PtySize) -> None:
        """Set the size of the terminal a command runs on (its foreground job gets SIGWINCH)."""
        await self.request("resize", pid=pid, cols=size.cols, rows=size.rows)

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
                cwd=p.get("cwd"),
                envs={k: v for k, v in (p.get("env") or {}).items() if v is not None},
                pty=bool(p.get("pty")),
            )
            for p in reply["processes"]
        ]

    # -- ports ------------------------------------------------------------------------

    async def connect(self, port: int) -> GuestStream:
        """A TCP connection from inside the sandbox to its 127.0.0.1:`port`, made by the
        agent; PortClosed when nothing listens there."""
        channel = await self._open_channel("connect", {"port": port})
        kind, payload = await channel.next()
        while kind not in (protocol.EVENT, protocol.REPLY):
            kind, payload = await channel.next()
        if kind == protocol.REPLY:
            self._check_reply("connect", payload)  # raises the refusal
            raise GuestError("the guest agent ended a connect without connecting")
        return GuestStream(self, channel)

    # -- files ------------------------------------------------------------------------

    async def read_file(
        self,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        user: str | None = None,
        home: bool = False,
    ) -> AsyncIterator[bytes]:
        """The content of a file, streamed in chunks of at most 64 KiB.

        Every file call takes `user` (act as that user of the sandbox: its permissions,
        new files its own; None: the default user) and `home` (relative paths from that
        user's home directory rather than the workdir).
        """
        args: dict[str, Any] = {"path": path, "offset": offset, **_acting(user, home)}
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

    @tracing.traced("agent.write")
    async def write_file(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes] | Iterable[bytes],
        *,
        mode: int = 0o644,
        append: bool = False,
        in_place: bool = False,
        metadata: Mapping[str, str] | None = None,
        user: str | None = None,
        home: bool = False,
    ) -> EntryInfo:
        """Write a file (creating its parents); it appears whole, on success only.

        `in_place` truncates and writes the file itself (E2B's way: watchers see the
        file's own events; a failed write leaves part of it). `metadata`, when given,
        replaces the file's metadata (``user.e2b.*`` extended attributes).
        """
        args: dict[str, Any] = {"path": path, "mode": mode, "append": append}
        if in_place:
            args["in_place"] = True
        if metadata is not None:
            args["metadata"] = dict(metadata)
        channel = await self._open_channel("write", {**args, **_acting(user, home)})
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
        except ChannelEnded:
            pass  # the agent refused early: its reply says why
        except BaseException:
            self._close_channel(channel, InvalidRequest("the write was abandoned"))
            raise
        reply = await channel.reply("write")
        return _entry(reply["entry"])

    @tracing.traced("agent.list")
    async def list_dir(
        self, path: str, *, depth: int = 1, user: str | None = None, home: bool = False
    ) -> list[EntryInfo]:
        """The entries under a directory, `depth` levels deep (symlinks not followed)."""
        args = {"path": path, "depth": depth, **_acting(user, home)}
        channel = await self._open_channel("list", args)
        entries: list[EntryInfo] = []
        while True:
            kind, payload = await channel.next()
            if kind == protocol.EVENT:
                entries.extend(_entry(e) for e in protocol.decode_json(payload)["entries"])
            elif kind == protocol.REPLY:
                reply = self._check_reply("list", payload)
                entries.extend(_entry(e) for e in reply["entries"])
                return entries

    async def stat(self, path: str, *, user: str | None = None, home: bool = False) -> EntryInfo:
        return _entry((await self.request("stat", path=path, **_acting(user, home)))["entry"])

    async def make_dir(self, path: str, *, user: str | None = None, home: bool = False) -> bool:
        """Create a directory and its parents; False if it already existed."""
        reply = await self.request("mkdir", path=path, **_acting(user, home))
        return bool(reply["created"])

    async def remove(
        self, path: str, *, recursive: bool = False, user: str | None = None, home: bool = False
    ) -> None:
        await self.request("remove", path=path, recursive=recursive, **_acting(user, home))

    async def rename(
        self,
        src: str,
        dst: str,
        *,
        overwrite: bool = True,
        user: str | None = None,
        home: bool = False,
    ) -> EntryInfo | None:
        """Move `src` to `dst`; the entry now at `dst`."""
        args = {"src": src, "dst": dst, "overwrite": overwrite, **_acting(user, home)}
        reply = await self.request("rename", **args)
        entry = reply.get("entry")
        return None if entry is None else _entry(entry)

    async def watch(
        self,
        path: str,
        *,
        recursive: bool = False,
        entries: bool = False,
        user: str | None = None,
        home: bool = False,
    ) -> GuestWatch:
        """Watch a directory's changes (inotify inside the sandbox) until closed."""
        args = {"path": path, "recursive": recursive, "entries": entries, **_acting(user, home)}
        channel = await self._open_channel("watch", args)
        kind, payload = await channel.next()
        if kind == protocol.REPLY:
            self._check_reply("watch", payload)  # raises the refusal
            raise GuestError("the guest agent ended a watch without watching")
        return GuestWatch(self, channel)

    async def sync(self) -> None:
        """Wait until everything the agent saw before now has arrived (a round trip: the
        agent reads its watches before it answers any call)."""
        await self.request("ping")
