"""Terminals in a sandbox (async): `sandbox.pty`, E2B's vocabulary.

A PTY command runs on a terminal of its own: its output is one stream of bytes (what a
terminal shows, escape sequences included) given to `on_data` as it comes, its input is
what a keyboard would type (`send_stdin`: b"\\x03" is Ctrl-C), and `resize` changes the
size (the program gets SIGWINCH). A terminal started here runs on when this client goes
away (`disconnect`, or the connection lost), until it exits or is killed: `connect`
follows it again.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence

from corral.client._commands import AsyncCommandHandle, DataCallback, open_handle
from corral.client._connection import Connection
from corral.terminal import PtySize
from corral.v1 import sandbox_pb2 as pb

# A login shell: bash where the template has it, else sh (distroless images have neither).
DEFAULT_SHELL = "[ -x /bin/bash ] && exec /bin/bash -i -l; exec /bin/sh -i -l"
# What a terminal sets unless `envs` says otherwise (TERM=xterm-256color comes from the
# server).
DEFAULT_ENVS = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class AsyncPty:
    """`sandbox.pty`: start terminals, follow them again, type into them, resize them."""

    def __init__(self, connection: Connection, sandbox_id: str) -> None:
        self._connection = connection
        self._sandbox_id = sandbox_id

    async def create(
        self,
        cols: int = 80,
        rows: int = 24,
        *,
        on_data: DataCallback | None = None,
        cmd: str | Sequence[str] | None = None,
        envs: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        background: bool = True,
    ) -> AsyncCommandHandle:
        """Start `cmd` (a login shell by default) on a new terminal of `cols` x `rows`.

        Returns at once with a handle (its `pid`, `wait`, `kill`, `disconnect`); the
        output goes to `on_data` as it comes. `timeout` (seconds; None: none) kills it with
        reason "timeout". With `background=False` it dies when this client goes away,
        like `docker exec -it`.
        """
        size = PtySize(cols, rows)
        command = DEFAULT_SHELL if cmd is None else cmd
        request = pb.ExecRequest(
            sandbox_id=self._sandbox_id,
            envs={**DEFAULT_ENVS, **(envs or {})},
            cwd=cwd or "",
            user=user or "",
            timeout_seconds=timeout or 0.0,
            background=background,
            pty=pb.PtySize(cols=size.cols, rows=size.rows),
        )
        if isinstance(command, str):
            request.cmd = command
        else:
            request.argv.extend(command)
        events = self._connection.stream(self._connection.rpc.exec, request)
        handle = await open_handle(self._connection, self._sandbox_id, events, on_data=on_data)
        handle._read_in_background()
        return handle

    async def connect(self, pid: int, *, on_data: DataCallback | None = None) -> AsyncCommandHandle:
        """Follow a running terminal again: its output from now on (to `on_data`) and its
        end. NotFound if it is not running."""
        request = pb.AttachRequest(sandbox_id=self._sandbox_id, pid=pid)
        events = self._connection.stream(self._connection.rpc.attach, request)
        handle = await open_handle(self._connection, self._sandbox_id, events, on_data=on_data)
        handle._read_in_background()
        return handle

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        """Type into the terminal (b"\\x03" is Ctrl-C, b"\\x04" Ctrl-D)."""
        raw = data.encode() if isinstance(data, str) else data
        request = pb.SendInputRequest(sandbox_id=self._sandbox_id, pid=pid, data=raw)
        await self._connection.call(self._connection.rpc.send_input, request)

    async def resize(self, pid: int, cols: int, rows: int) -> None:
        """Change the terminal's size; the program on it gets SIGWINCH."""
        size = PtySize(cols, rows)
        request = pb.ResizeRequest(
            sandbox_id=self._sandbox_id, pid=pid, size=pb.PtySize(cols=size.cols, rows=size.rows)
        )
        await self._connection.call(self._connection.rpc.resize, request)

    async def kill(self, pid: int) -> None:
        """SIGKILL the terminal's program and its process group."""
        request = pb.SignalRequest(
            sandbox_id=self._sandbox_id, pid=pid, signal=signal.SIGKILL, group=True
        )
        await self._connection.call(self._connection.rpc.signal, request)
