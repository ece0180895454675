"""The official SDK's `sandbox.commands` on Corral (envd's process.Process), sync and async:
what E2B's own tests and programs rely on."""

from __future__ import annotations

import pytest
from e2b import (
    AsyncSandbox,
    CommandExitException,
    NotFoundException,
    Sandbox,
    TimeoutException,
)

SANDBOX_TIMEOUT = 300


# -- sync ----------------------------------------------------------------------------------


def test_run_returns_output_and_exit_code(sandbox: Sandbox) -> None:
    result = sandbox.commands.run('echo "!@#$%^&*()_+"; echo oops >&2')
    assert (result.exit_code, result.stdout, result.stderr) == (0, "!@#$%^&*()_+\n", "oops\n")
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo partial; exit 7")
    assert (failed.value.exit_code, failed.value.stdout) == (7, "partial\n")


def test_bytes_arrive_raw(sandbox: Sandbox) -> None:
    result = sandbox.commands.run('printf "' + "a" * 8191 + '\\xe2"')
    assert result.stdout == "a" * 8191 + "\ufffd"  # the SDK decodes; the server passed the byte


def test_envs_are_per_command_and_home_is_the_cwd(sandbox: Sandbox) -> None:
    assert sandbox.commands.run("echo $FOO", envs={"FOO": "bar"}).stdout == "bar\n"
    assert sandbox.commands.run('echo "[$FOO]"').stdout == "[]\n"
    python = "python3 -c \"import os; print(os.environ['FOO'])\""
    assert sandbox.commands.run(python, envs={"FOO": "py"}).stdout == "py\n"
    assert sandbox.commands.run("pwd").stdout == "/home/user\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("mkdir -p sub && pwd", cwd=".").stdout == "/home/user\n"
    assert sandbox.commands.run("pwd", cwd="sub").stdout == "/home/user/sub\n"
    assert sandbox.commands.run("pwd; whoami", user="root").stdout == "/root\nroot\n"


def test_sandbox_envs_reach_every_command() -> None:
    box = Sandbox.create("base", envs={"FOO": "sandbox"}, timeout=SANDBOX_TIMEOUT)
    try:
        assert box.commands.run("echo $FOO").stdout == "sandbox\n"
    finally:
        box.kill()


def test_a_too_short_timeout_raises(sandbox: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 10", timeout=2)


def test_stdin_is_sent_and_closed(sandbox: Sandbox) -> None:
    echo = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(echo.pid, "Hello,\nWorld!")
    for stdout, _, _ in echo:
        assert stdout == "Hello,\nWorld!"
        break
    cat = sandbox.commands.run("cat", background=True, stdin=True)
    cat.send_stdin(b"bytes")
    cat.close_stdin()
    result = cat.wait()
    assert (result.exit_code, result.stdout) == (0, "bytes")


def test_background_commands_are_listed_connected_and_killed(sandbox: Sandbox) -> None:
    first = sandbox.commands.run("sleep 30", background=True)
    second = sandbox.commands.run("sleep 30", background=True)
    listed = {p.pid: p for p in sandbox.commands.list()}
    assert {first.pid, second.pid} <= set(listed)
    mine = listed[first.pid]
    assert (mine.cmd, mine.args) == ("/bin/bash", ["-l", "-c", "sleep 30"])
    assert sandbox.commands.connect(first.pid).pid == first.pid
    assert sandbox.commands.kill(first.pid)
    with pytest.raises(CommandExitException):
        sandbox.commands.run(f"kill -0 {first.pid}")
    assert second.kill()


def test_unknown_pids_are_not_found(sandbox: Sandbox) -> None:
    assert not sandbox.commands.kill(999999)
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999999)


def test_a_disconnected_command_goes_on_and_is_reconnected(sandbox: Sandbox) -> None:
    handle = sandbox.commands.run("sleep 2; echo done", background=True)
    handle.disconnect()
    result = sandbox.commands.connect(handle.pid).wait()
    assert result.exit_code == 0  # its output before the reconnect went to nobody


def test_a_killed_sandbox_ends_its_commands_as_killed() -> None:
    box = Sandbox.create("base", timeout=SANDBOX_TIMEOUT)
    command = box.commands.run("sleep 60", background=True)
    box.kill()
    with pytest.raises(TimeoutException) as ended:
        command.wait()
    assert "sandbox was killed or reached its end of life" in str(ended.value)


# -- async ---------------------------------------------------------------------------------


async def test_async_run_envs_and_stdin(async_sandbox: AsyncSandbox) -> None:
    result = await async_sandbox.commands.run('echo "$FOO"', envs={"FOO": "async"})
    assert (result.exit_code, result.stdout) == (0, "async\n")
    cat = await async_sandbox.commands.run("cat", background=True, stdin=True)
    await async_sandbox.commands.send_stdin(cat.pid, "in")
    await cat.close_stdin()
    assert (await cat.wait()).stdout == "in"


async def test_async_background_list_connect_kill(async_sandbox: AsyncSandbox) -> None:
    command = await async_sandbox.commands.run("sleep 30", background=True)
    assert command.pid in [p.pid for p in await async_sandbox.commands.list()]
    assert (await async_sandbox.commands.connect(command.pid)).pid == command.pid
    assert await async_sandbox.commands.kill(command.pid)
    assert not await async_sandbox.commands.kill(999999)
    with pytest.raises(NotFoundException):
        await async_sandbox.commands.connect(999999)
    with pytest.raises(CommandExitException):
        await async_sandbox.commands.run(f"kill -0 {command.pid}")


async def test_async_a_too_short_timeout_raises(async_sandbox: AsyncSandbox) -> None:
    with pytest.raises(TimeoutException):
        await async_sandbox.commands.run("sleep 10", timeout=2)


async def test_async_a_killed_sandbox_ends_its_commands_as_killed() -> None:
    box = await AsyncSandbox.create("base", timeout=SANDBOX_TIMEOUT)
    command = await box.commands.run("sleep 60", background=True)
    await box.kill()
    with pytest.raises(TimeoutException) as ended:
        await command.wait()
    assert "sandbox was killed or reached its end of life" in str(ended.value)
