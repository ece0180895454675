"""The commands started through the API that are still attached, by (sandbox, pid).

SendInput, CloseInput and Signal reach a command through here: the guest connection
gives stdin only to the channel that started the command.
"""

from __future__ import annotations

from collections import defaultdict

from corral.errors import NotFound
from corral.isolation import Command


class CommandRegistry:
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
