"""The sync SDK: each class wraps its async twin and runs it on the portal (`_portal`).

Methods returning plain data are derived with `bridge`; only methods returning another
SDK object (a sandbox, a command handle) are written out, to wrap what they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Unpack, overload

from corral.client._commands import AsyncCommandHandle, AsyncCommands, RunOptions
from corral.client._files import AsyncFiles
from corral.client._models import CommandResult, SandboxInfo
from corral.client._portal import bridge, bridge_factory, run
from corral.client._sandbox import AsyncSandbox


class CommandHandle:
    """A command started with `background=True`: pid, stdin, signals, result."""

    def __init__(self, handle: AsyncCommandHandle) -> None:
        self._async = handle
        self.pid = handle.pid

    @property
    def stdout(self) -> str:
        return self._async.stdout

    @property
    def stderr(self) -> str:
        return self._async.stderr

    wait = bridge(AsyncCommandHandle.wait)
    kill = bridge(AsyncCommandHandle.kill)
    send_stdin = bridge(AsyncCommandHandle.send_stdin)
    close_stdin = bridge(AsyncCommandHandle.close_stdin)
    signal = bridge(AsyncCommandHandle.signal)
    disconnect = bridge(AsyncCommandHandle.disconnect)


class Commands:
    __doc__ = AsyncCommands.__doc__

    def __init__(self, commands: AsyncCommands) -> None:
        self._async = commands

    @overload
    def run(
        self,
        cmd: str | Sequence[str],
        *,
        background: Literal[False] = False,
        **options: Unpack[RunOptions],
    ) -> CommandResult: ...

    @overload
    def run(
        self, cmd: str | Sequence[str], *, background: Literal[True], **options: Unpack[RunOptions]
    ) -> CommandHandle: ...

    def run(
        self, cmd: str | Sequence[str], *, background: bool = False, **options: Unpack[RunOptions]
    ) -> CommandResult | CommandHandle:
        if background:
            return CommandHandle(run(self._async.run(cmd, background=True, **options)))
        return run(self._async.run(cmd, background=False, **options))

    run.__doc__ = AsyncCommands.run.__doc__

    list = bridge(AsyncCommands.list)
    kill = bridge(AsyncCommands.kill)
    send_stdin = bridge(AsyncCommands.send_stdin)


class Files:
    __doc__ = AsyncFiles.__doc__

    def __init__(self, files: AsyncFiles) -> None:
        self._async = files

    read = bridge(AsyncFiles.read)
    read_bytes = bridge(AsyncFiles.read_bytes)
    write = bridge(AsyncFiles.write)
    list = bridge(AsyncFiles.list)
    get_info = bridge(AsyncFiles.get_info)
    exists = bridge(AsyncFiles.exists)
    make_dir = bridge(AsyncFiles.make_dir)
    remove = bridge(AsyncFiles.remove)
    rename = bridge(AsyncFiles.rename)


class Sandbox:
    """A sandbox on a Corral server (sync API). Get one from `create` or `connect`.

    with Sandbox.create(timeout=120) as sbx:       # killed on exit
        print(sbx.commands.run("echo hi").stdout)
    """

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._async = sandbox
        self.commands = Commands(sandbox.commands)
        self.files = Files(sandbox.files)

    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def info(self) -> SandboxInfo:
        return self._async.info

    def __repr__(self) -> str:
        return f"<Sandbox {self.sandbox_id} {self.info.state}>"

    create = staticmethod(bridge_factory(AsyncSandbox.create, lambda box: Sandbox(box)))
    connect = staticmethod(bridge_factory(AsyncSandbox.connect, lambda box: Sandbox(box)))
    list = staticmethod(bridge_factory(AsyncSandbox.list, lambda infos: infos))

    get_info = bridge(AsyncSandbox.get_info)
    is_running = bridge(AsyncSandbox.is_running)
    kill = bridge(AsyncSandbox.kill)
    pause = bridge(AsyncSandbox.pause)
    resume = bridge(AsyncSandbox.resume)
    set_timeout = bridge(AsyncSandbox.set_timeout)
    ping = bridge(AsyncSandbox.ping)
    get_metrics = bridge(AsyncSandbox.get_metrics)
    close = bridge(AsyncSandbox.aclose)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        run(self._async.__aexit__(*exc))
