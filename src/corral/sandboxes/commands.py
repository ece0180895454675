"""Commands in teams' live sandboxes: exec (streamed), stdin, signals, the process list.

Every exec runs under the sandbox's environment (the command's own envs on top) and its
output counts as activity for the sandbox's idle timer. A command started by `exec`
stays attached, by (sandbox, pid), while its caller streams it: `send_input`,
`close_input` and `signal` reach it through here, because the guest connection gives
stdin only to the channel that started the command.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.errors import InvalidRequest, NotFound
from corral.guest import ExecResult, OutputChunk, ProcessInfo
from corral.isolation import Command

if TYPE_CHECKING:
    from corral.sandboxes.manager import SandboxManager
    from corral.store import Team


@dataclass(frozen=True)
class Started:
    """The first event of an exec: the command runs as this pid of the sandbox."""

    pid: int


# What `SandboxCommands.exec` streams: Started, then output chunks, then how it ended.
ExecEvent = Started | OutputChunk | ExecResult


@dataclass(frozen=True)
class PtySize:
    """A terminal's size in character cells: a command given one runs on a pseudo-terminal
    (its output is one stream, stdout; its input goes through `send_input`)."""

    cols: int
    rows: int


class AttachedCommands:
    """The commands started by `exec` whose callers still stream them, by (sandbox, pid)."""

    def __init__(self) -> None:
        self._commands: defaultdict[str, dict[int, Command]] = defaultdict(dict)

    def add(self, sandbox_id: str, command: Command) -> None:
        if command.pid > 0:
            self._commands[sandbox_id][command.pid] = command

    def discard(self, sandbox_id: str, command: Command) -> None:
        commands = self._commands.get(sandbox_id)
        if commands is not None and commands.get(command.pid) is command:
            del commands[command.pid]
            if not commands:
                del self._commands[sandbox_id]

    def find(self, sandbox_id: str, pid: int) -> Command | None:
        return self._commands.get(sandbox_id, {}).get(pid)

    def get(self, sandbox_id: str, pid: int) -> Command:
        command = self.find(sandbox_id, pid)
        if command is None:
            raise NotFound(
                f"no attached process {pid} in sandbox {sandbox_id}: it has ended, or it was "
                "not started through the API with stdin; list them with `corral sandbox ps`"
            )
        return command

    def __len__(self) -> int:
        return sum(len(c) for c in self._commands.values())


class SandboxCommands:
    """The commands of a manager's live sandboxes: `SandboxManager.commands`."""

    def __init__(self, manager: SandboxManager) -> None:
        self._manager = manager
        self.attached = AttachedCommands()

    async def exec(
        self,
        team: Team,
        sandbox_id: str,
        command: Sequence[str] | str,
        *,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        output_limit: int | None = None,
        stdin: bool = False,
        background: bool = False,
        tag: str | None = None,
        pty: PtySize | None = None,
        client_gone: asyncio.Event | None = None,
    ) -> AsyncGenerator[ExecEvent]:
        """Start a command and stream it: `Started`, its output chunks, its `ExecResult`.

        Close the stream (`contextlib.aclosing`) when done with it: a command that has not
        ended is then killed, unless `background`, and detached. When `client_gone` is set
        meanwhile (the caller's client went away while the command printed nothing), a
        foreground command is killed at once and a background one left running.
        """
        if pty is not None:
            raise InvalidRequest("pty is not supported yet: run the command without a pty")
        box = await self._manager.running(team, sandbox_id)
        process = await box.exec(
            command,
            env={**self._manager.envs(sandbox_id), **(envs or {})},
            cwd=cwd,
            user=user,
            timeout=timeout,
            output_limit=output_limit,
            stdin=stdin,
            background=background,
            tag=tag,
        )
        watcher = (
            asyncio.create_task(_stop_when_gone(client_gone, process, background))
            if client_gone is not None
            else None
        )
        self.attached.add(sandbox_id, process)
        ended = False
        try:
            yield Started(process.pid)
            async for chunk in process:
                self._manager.touch(sandbox_id)
                yield chunk
            result = await process.wait()
            ended = True
            yield result
        finally:
            if watcher is not None:
                watcher.cancel()
            self.attached.discard(sandbox_id, process)
            if not ended:
                with contextlib.suppress(Exception):
                    if not background:
                        await process.kill()
                    await process.detach()

    async def send_input(self, team: Team, sandbox_id: str, pid: int, data: bytes) -> None:
        """Write to the stdin of a command that `exec` started with `stdin`."""
        await self._manager.running(team, sandbox_id)
        await self.attached.get(sandbox_id, pid).write_stdin(data)
        self._manager.touch(sandbox_id)

    async def close_input(self, team: Team, sandbox_id: str, pid: int) -> None:
        await self._manager.running(team, sandbox_id)
        await self.attached.get(sandbox_id, pid).close_stdin()

    async def signal(
        self, team: Team, sandbox_id: str, pid: int, signum: int, *, group: bool = False
    ) -> None:
        """Signal a process of the sandbox (its process group with `group`)."""
        box = await self._manager.running(team, sandbox_id)
        command = self.attached.find(sandbox_id, pid)
        if command is not None:  # through the Command, so a kill is reported as "killed"
            await command.signal(signum, group=group)
        else:
            await box.signal(pid, signum, group=group)

    async def resize(self, team: Team, sandbox_id: str, pid: int, cols: int, rows: int) -> None:
        """Set the terminal size of a command started with a `pty`."""
        await self._manager.running(team, sandbox_id)
        raise InvalidRequest("resize is not supported yet: no command runs on a pty")

    async def attach(self, team: Team, sandbox_id: str, pid: int) -> AsyncGenerator[ExecEvent]:
        """Follow a running command: `Started`, its output from now on, its `ExecResult`.

        Raises NotFound for a pid that is unknown or has ended.
        """
        await self._manager.running(team, sandbox_id)
        raise InvalidRequest("attach is not supported yet")
        yield Started(pid)  # pragma: no cover - makes this an async generator

    async def processes(self, team: Team, sandbox_id: str) -> list[ProcessInfo]:
        box = await self._manager.running(team, sandbox_id)
        return await box.processes()


async def _stop_when_gone(gone: asyncio.Event, command: Command, background: bool) -> None:
    """A foreground command dies with its client; a background one is left running."""
    await gone.wait()
    if background:
        await command.detach()
    else:
        await command.kill()
