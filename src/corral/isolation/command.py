"""A command running in a sandbox, and its whole result once it has ended.

`Command` wraps either kind of running process (one the guest agent started, or a
one-shot sandbox's entrypoint) and tells an OOM kill from other kills by the sandbox's
cgroup counter, which the process itself cannot see.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from corral.guest import ExecResult, OutputChunk


@dataclass(frozen=True)
class CommandResult:
    """A finished command with its whole output."""

    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int | None
    reason: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.reason == "exited"


class _Process(Protocol):
    """A running command: one the guest agent started (`GuestProcess`) or a one-shot
    sandbox's entrypoint (`EntryProcess`)."""

    pid: int

    def __aiter__(self) -> AsyncIterator[OutputChunk]: ...
    async def wait(self) -> ExecResult: ...
    async def collect(self) -> tuple[bytes, bytes, ExecResult]: ...
    async def write_stdin(self, data: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def signal(self, signum: int, *, group: bool = False) -> None: ...
    async def kill(self) -> None: ...
    async def detach(self) -> None: ...


class Command:
    """A command running in a sandbox: its output chunks, stdin, signals and result."""

    def __init__(
        self, process: _Process, oom_kills: Callable[[], int], oom_kills_before: int
    ) -> None:
        self._oom_kills = oom_kills
        self._process = process
        self._oom_kills_before = oom_kills_before
        self._we_killed = False
        self.pid = process.pid

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._process.__aiter__()

    async def wait(self) -> ExecResult:
        return self._explain(await self._process.wait())

    async def collect(self) -> CommandResult:
        stdout, stderr, result = await self._process.collect()
        result = self._explain(result)
        return CommandResult(
            stdout, stderr, result.exit_code, result.signal, result.reason, result.error
        )

    async def write_stdin(self, data: bytes) -> None:
        await self._process.write_stdin(data)

    async def close_stdin(self) -> None:
        await self._process.close_stdin()

    async def signal(self, signum: int, *, group: bool = False) -> None:
        if signum == signal.SIGKILL:
            self._we_killed = True
        await self._process.signal(signum, group=group)

    async def kill(self) -> None:
        self._we_killed = True
        await self._process.kill()

    async def detach(self) -> None:
        await self._process.detach()

    def _explain(self, result: ExecResult) -> ExecResult:
        """Tell an OOM kill from other kills: the agent sees only a SIGKILL, or (under a
        shell that outlived its child) an exit code of 128 + SIGKILL."""
        killed = (result.reason == "killed" and result.signal == signal.SIGKILL) or (
            result.reason == "exited" and result.exit_code == 128 + signal.SIGKILL
        )
        if killed and not self._we_killed and self._oom_kills() > self._oom_kills_before:
            return ExecResult(
                exit_code=result.exit_code,
                signal=result.signal,
                reason="oom_killed",
                output_bytes=result.output_bytes,
                error="the command ran out of memory; raise the sandbox's memory limit",
            )
        return result
