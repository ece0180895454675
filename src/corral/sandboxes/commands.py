"""Commands in teams' live sandboxes: exec and attach (streamed), stdin, terminal size,
signals, the process list.

Every exec runs under the sandbox's environment (the command's own envs on top) and its
output counts as activity for the sandbox's idle timer while someone streams it. The
manager follows a command, by (sandbox, pid), while any stream watches it: one reader of
the guest's output (`Followed`) hands each chunk to every watching stream (the exec that
started it, and each `attach`); `signal` goes through it, so a kill is reported as
"killed". Input (`send_input`, `close_input`) reaches a running command by pid, followed
or not. When the last stream goes, a foreground command is killed; a background one is
left running, its output discarded by the agent and its stdin kept open for input,
until an `attach` follows it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral import tracing
from corral.errors import CommandError, NotFound
from corral.guest import ExecResult, OutputChunk, ProcessInfo
from corral.isolation import Command
from corral.sandboxes.observe import observed_exec
from corral.terminal import PtySize

if TYPE_CHECKING:
    from corral.sandboxes.manager import SandboxManager
    from corral.store import Team

__all__ = ["AttachedCommands", "ExecEvent", "Followed", "PtySize", "SandboxCommands", "Started"]

# Chunks a watcher may lag behind the command before it holds up the other watchers
# (and, through the guest's credit, the command itself).
WATCHER_BACKLOG = 16


@dataclass(frozen=True)
class Started:
    """The first event of an exec or attach: the command runs as this pid of the sandbox."""

    pid: int


# What `SandboxCommands.exec` and `attach` stream: Started, output chunks, how it ended.
ExecEvent = Started | OutputChunk | ExecResult


class _Watcher:
    """One stream watching a followed command: the events not yet delivered to it
    (an exception when following failed; None when the stream is told to stop)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ExecEvent | Exception | None] = asyncio.Queue(WATCHER_BACKLOG)

    def drain(self) -> None:
        """Drop what it has not taken, which also frees a reader blocked on it."""
        while not self.queue.empty():
            self.queue.get_nowait()

    def stop(self) -> None:
        """End its stream now (its client went away)."""
        self.drain()
        self.queue.put_nowait(None)

    async def events(self) -> AsyncIterator[ExecEvent]:
        """Chunks as the command writes them, then its result."""
        while (event := await self.queue.get()) is not None:
            if isinstance(event, Exception):
                raise event
            yield event
            if isinstance(event, ExecResult):
                return


class Followed:
    """A command the manager reads on behalf of the streams watching it."""

    def __init__(self, command: Command, *, background: bool, touch: Callable[[], None]) -> None:
        self.command = command
        self.background = background
        self.ended = False
        self._touch = touch
        self._watchers: list[_Watcher] = []
        self._reader: asyncio.Task[None] | None = None
        self._on_end: list[Callable[[], None]] = []

    @property
    def pid(self) -> int:
        return self.command.pid

    def watch(self) -> _Watcher:
        """A new watcher, which gets the command's output from now on and its end."""
        watcher = _Watcher()
        self._watchers.append(watcher)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        return watcher

    def leave(self, watcher: _Watcher) -> bool:
        """Stop delivering to `watcher`; True if nobody watches any more."""
        if watcher in self._watchers:
            self._watchers.remove(watcher)
        watcher.drain()
        return not self._watchers

    def on_end(self, callback: Callable[[], None]) -> None:
        self._on_end.append(callback)

    async def stop_following(self) -> None:
        """Stop reading the command and let go of it in the guest (`Command.detach`)."""
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(Exception):
            await self.command.detach()

    async def _read(self) -> None:
        event: ExecResult | Exception
        try:
            async for chunk in self.command:
                if self._watchers:
                    self._touch()
                for watcher in list(self._watchers):
                    await watcher.queue.put(chunk)
            event = await self.command.wait()
        except Exception as exc:  # the guest failed: every watcher's stream says so
            event = exc
        self.ended = True
        for callback in self._on_end:
            callback()
        for watcher in list(self._watchers):
            await watcher.queue.put(event)


class AttachedCommands:
    """The commands the manager follows because a stream watches them, by (sandbox, pid)."""

    def __init__(self) -> None:
        self._commands: defaultdict[str, dict[int, Followed]] = defaultdict(dict)

    def add(self, sandbox_id: str, followed: Followed) -> None:
        if followed.pid > 0:
            self._commands[sandbox_id][followed.pid] = followed

    def discard(self, sandbox_id: str, followed: Followed) -> None:
        commands = self._commands.get(sandbox_id)
        if commands is not None and commands.get(followed.pid) is followed:
            del commands[followed.pid]
            if not commands:
                del self._commands[sandbox_id]

    def find(self, sandbox_id: str, pid: int) -> Followed | None:
        return self._commands.get(sandbox_id, {}).get(pid)

    def __len__(self) -> int:
        return sum(len(c) for c in self._commands.values())


class SandboxCommands:
    """The commands of a manager's live sandboxes: `SandboxManager.commands`."""

    def __init__(self, manager: SandboxManager) -> None:
        self._manager = manager
        self.attached = AttachedCommands()
        self._attaching = asyncio.Lock()  # one guest attach at a time: no double follow

    @observed_exec
    async def exec(
        self,
        team: Team,
        sandbox_id: str,
        command: Sequence[str] | str,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        home: bool = False,
        timeout: float | None = None,
        output_limit: int | None = None,
        stdin: bool = False,
        background: bool = False,
        tag: str | None = None,
        pty: PtySize | None = None,
        client_gone: asyncio.Event | None = None,
    ) -> AsyncGenerator[ExecEvent]:
        """Start a command and stream it: `Started`, its output chunks, its `ExecResult`.

        With `pty` it runs on a terminal of that size: its output is one stream (stdout),
        its input goes through `send_input` (whatever `stdin` says), `resize` changes the
        size. Close the stream (`contextlib.aclosing`) when done with it: a command that
        has not ended is then killed, unless `background`. When `client_gone` is set
        meanwhile (the caller's client went away while the command printed nothing), a
        foreground command is killed at once and a background one left running. With
        `home` it starts in its user's home, which a relative `cwd` is resolved from.
        """
        # One span from the start to the end of the command (or of its stream).
        with tracing.lasting(
            "sandbox.exec", {tracing.SANDBOX_ID: sandbox_id, "corral.exec.pty": pty is not None}
        ) as span:
            with tracing.within(span):
                box = await self._manager.running(team, sandbox_id)
                process = await box.exec(
                    command,
                    env={**self._manager.envs(sandbox_id), **(envs or {})},
                    cwd=cwd,
                    user=user,
                    home=home,
                    timeout=timeout,
                    output_limit=output_limit,
                    stdin=stdin,
                    background=background,
                    tag=tag,
                    pty=pty,
                )
            span.set_attribute("corral.exec.pid", process.pid)
            followed = self._follow(sandbox_id, process, background=background)
            stream = self._stream(sandbox_id, followed, client_gone, owner=True)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    if isinstance(event, ExecResult):
                        span.set_attributes(
                            {
                                "corral.exec.exit_code": event.exit_code,
                                "corral.exec.end": event.reason,
                            }
                        )
                    yield event

    async def attach(
        self, team: Team, sandbox_id: str, pid: int, *, client_gone: asyncio.Event | None = None
    ) -> AsyncGenerator[ExecEvent]:
        """Follow a running command: `Started`, its output from now on, its `ExecResult`.

        Any number of streams may follow one command; closing this one never stops it.
        Raises NotFound for a pid that is unknown or has ended.
        """
        box = await self._manager.running(team, sandbox_id)
        followed = self.attached.find(sandbox_id, pid)
        if followed is None:
            async with self._attaching:
                followed = self.attached.find(sandbox_id, pid)
                if followed is None:
                    try:
                        process = await box.attach(pid)
                    except CommandError:
                        raise NotFound(
                            f"no running process {pid} in sandbox {sandbox_id}: it has "
                            "ended, or never ran; `corral sandbox ps` lists the running ones"
                        ) from None
                    # Only a background command outlives its first stream to be found here.
                    followed = self._follow(sandbox_id, process, background=True)
        stream = self._stream(sandbox_id, followed, client_gone, owner=False)
        async with contextlib.aclosing(stream):
            async for event in stream:
                yield event

    def _follow(self, sandbox_id: str, process: Command, *, background: bool) -> Followed:
        followed = Followed(
            process, background=background, touch=lambda: self._manager.touch(sandbox_id)
        )
        self.attached.add(sandbox_id, followed)
        # Forgotten as it ends, before its watchers hear of it: stdin then is NotFound.
        followed.on_end(lambda: self.attached.discard(sandbox_id, followed))
        return followed

    async def _stream(
        self,
        sandbox_id: str,
        followed: Followed,
        client_gone: asyncio.Event | None,
        *,
        owner: bool,
    ) -> AsyncGenerator[ExecEvent]:
        """One watcher's stream of `followed`; the `owner` (the exec that started it) kills
        a foreground command when it goes before the end."""
        watcher = followed.watch()
        kills = owner and not followed.background
        gone = (
            asyncio.create_task(_when_gone(client_gone, followed, watcher, kills))
            if client_gone is not None
            else None
        )
        ended = False
        try:
            yield Started(followed.pid)
            async for event in watcher.events():
                yield event
                ended = isinstance(event, ExecResult)
        finally:
            if gone is not None:
                gone.cancel()
            alone = followed.leave(watcher)
            if not ended and not followed.ended:
                if kills:
                    with contextlib.suppress(Exception):
                        await followed.command.kill()
                if alone:
                    self.attached.discard(sandbox_id, followed)
                    await followed.stop_following()

    async def send_input(self, team: Team, sandbox_id: str, pid: int, data: bytes) -> None:
        """Write to the input of a running command (started with `stdin` or a `pty`),
        followed by a stream or not; returns once the command's pipe took the bytes."""
        box = await self._manager.running(team, sandbox_id)
        try:
            await box.write_input(pid, data)
        except CommandError as exc:
            raise _not_running(sandbox_id, exc) from None
        self._manager.touch(sandbox_id)

    async def close_input(self, team: Team, sandbox_id: str, pid: int) -> None:
        """End the input of a running command, once it has read what was written."""
        box = await self._manager.running(team, sandbox_id)
        try:
            await box.close_input(pid)
        except CommandError as exc:
            raise _not_running(sandbox_id, exc) from None

    async def resize(self, team: Team, sandbox_id: str, pid: int, cols: int, rows: int) -> None:
        """Set the terminal size of a command started with a `pty`."""
        size = PtySize(cols, rows)
        box = await self._manager.running(team, sandbox_id)
        try:
            await box.resize(pid, size)
        except CommandError:
            raise NotFound(
                f"no running process {pid} in sandbox {sandbox_id}: it has ended, or never "
                "ran; `corral sandbox ps` lists the running ones"
            ) from None

    async def signal(
        self, team: Team, sandbox_id: str, pid: int, signum: int, *, group: bool = False
    ) -> None:
        """Signal a process of the sandbox (its process group with `group`)."""
        box = await self._manager.running(team, sandbox_id)
        followed = self.attached.find(sandbox_id, pid)
        if followed is not None:  # through the Command, so a kill is reported as "killed"
            await followed.command.signal(signum, group=group)
        else:
            await box.signal(pid, signum, group=group)

    async def processes(self, team: Team, sandbox_id: str) -> list[ProcessInfo]:
        box = await self._manager.running(team, sandbox_id)
        return await box.processes()


def _not_running(sandbox_id: str, exc: CommandError) -> NotFound:
    """The guest's refusal (the process ended, or its stdin is closed) as NotFound."""
    return NotFound(f"sandbox {sandbox_id}: {exc}")


async def _when_gone(
    gone: asyncio.Event, followed: Followed, watcher: _Watcher, kills: bool
) -> None:
    """A foreground command dies with its exec's client (the stream then gets its end);
    any other stream just stops."""
    await gone.wait()
    if kills:
        with contextlib.suppress(Exception):  # it may have ended meanwhile
            await followed.command.kill()
    else:
        watcher.stop()
