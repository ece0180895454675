"""The official SDK's `sandbox.pty` on Corral (a Start with a terminal size), sync and async."""

from __future__ import annotations

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox
from e2b.sandbox.commands.command_handle import PtySize


def test_pty_runs_a_shell_with_envs(sandbox: Sandbox) -> None:
    terminal = sandbox.pty.create(PtySize(80, 24), envs={"ABC": "123"}, cwd="/")
    sandbox.pty.send_stdin(terminal.pid, b"echo $ABC\nexit\n")
    output: list[bytes] = []
    assert terminal.wait(on_pty=output.append).exit_code == 0
    assert "123" in b"".join(output).decode()


def test_pty_resize_is_seen_by_tput(sandbox: Sandbox) -> None:
    terminal = sandbox.pty.create(PtySize(cols=80, rows=24))
    sandbox.pty.resize(terminal.pid, PtySize(cols=100, rows=24))
    sandbox.pty.send_stdin(terminal.pid, b"tput cols\nexit\n")
    output: list[bytes] = []
    assert terminal.wait(on_pty=output.append).exit_code == 0
    assert "100" in b"".join(output).decode()


def test_pty_survives_a_disconnect(sandbox: Sandbox) -> None:
    terminal = sandbox.pty.create(PtySize(80, 24), envs={"FOO": "bar"})
    terminal.disconnect()
    again = sandbox.pty.connect(terminal.pid)
    sandbox.pty.send_stdin(terminal.pid, b"echo $FOO\nexit\n")
    output: list[bytes] = []
    assert again.wait(on_pty=output.append).exit_code == 0
    assert again.pid == terminal.pid and "bar" in b"".join(output).decode()


def test_pty_kill(sandbox: Sandbox) -> None:
    terminal = sandbox.pty.create(PtySize(80, 24))
    assert sandbox.pty.kill(terminal.pid)
    with pytest.raises(CommandExitException):
        sandbox.commands.run(f"kill -0 {terminal.pid}")
    assert not sandbox.pty.kill(999999)


async def test_async_pty_input_resize_and_kill(async_sandbox: AsyncSandbox) -> None:
    output: list[bytes] = []
    terminal = await async_sandbox.pty.create(PtySize(80, 24), on_data=output.append)
    await async_sandbox.pty.resize(terminal.pid, PtySize(cols=120, rows=24))
    await async_sandbox.pty.send_stdin(terminal.pid, b"tput cols\nexit\n")
    assert (await terminal.wait()).exit_code == 0
    assert "120" in b"".join(output).decode()
    other = await async_sandbox.pty.create(PtySize(80, 24), on_data=lambda _: None)
    assert await async_sandbox.pty.kill(other.pid)
    assert not await async_sandbox.pty.kill(999999)
