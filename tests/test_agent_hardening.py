"""The guest agent holds against its own sandbox's code: memory pressure, signals, FIFOs.

Each test attacks the real agent inside a real `namespace` sandbox (it is the pid
namespace's init there, as in production), then checks the agent still answers and
commands still run. Every call that a blocked or dead agent would never answer runs
under a deadline, so a regression fails here instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest, IsADirectory, PermissionDenied
from corral.guest import agent_source_dir
from corral.isolation import Engine, Limits, Sandbox
from tests.conftest import require_backend

pytestmark = [pytest.mark.sandbox, pytest.mark.hostile]

T = TypeVar("T")
DEADLINE = 20.0
# python3 allocating (and touching) 1 GiB: far past the small sandbox's 128 MiB.
HOG = "python3 -c 'b = bytearray(1 << 30); print(\"survived\")'"


async def answered(call: Awaitable[T]) -> T:
    """The call's result; a TimeoutError if the agent does not answer in time."""
    return await asyncio.wait_for(call, DEADLINE)


async def assert_agent_serves(box: Sandbox) -> None:
    """Pid 1 is still the agent, and it runs commands and does file operations."""
    ps = await answered(box.run(["cat", "/proc/1/cmdline"]))
    assert ps.exit_code == 0 and b"agent" in ps.stdout, ps
    await answered(box.write_file("probe.txt", b"alive"))
    assert await answered(box.read_bytes("probe.txt")) == b"alive"


@pytest.fixture
async def small(engine: Engine, settings: Settings) -> AsyncIterator[Sandbox]:
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace", limits=Limits(memory_mib=128, pids=64))
    yield box
    await box.destroy()


# -- the OOM killer takes commands, never the agent ---------------------------------------


async def test_commands_are_the_oom_killers_choice_over_the_agent(sandbox: Sandbox) -> None:
    result = await sandbox.run(["cat", "/proc/self/oom_score_adj"])
    assert int(result.stdout) == 1000
    # Read by the agent itself: a command would race the agent lowering its score back.
    agent = int(await sandbox.read_bytes("/proc/1/oom_score_adj"))
    assert agent < 1000


async def test_memory_hog_under_a_shell_is_oom_killed_and_the_agent_lives(
    small: Sandbox,
) -> None:
    # The shell outlives its child (`exit $?`), so the agent sees an exit code of 137.
    for command in (["sh", "-c", f"{HOG}; exit $?"], ["sh", "-c", HOG]):
        result = await answered(small.run(command))
        assert result.reason == "oom_killed", result
        assert result.exit_code == 137 and not result.ok
        assert b"survived" not in result.stdout
        assert result.error and "memory" in result.error
    assert small.usage().oom_kills >= 2
    await assert_agent_serves(small)


async def test_filling_tmp_under_default_limits_leaves_the_agent_alive(sandbox: Sandbox) -> None:
    # tmpfs pages are charged to the sandbox's memory, and the default disk limit (1 GiB)
    # is above the default memory limit (512 MiB): the storage is kept under the memory
    # (Limits.storage_bytes), so the writer gets ENOSPC and memory is left for the agent.
    # Storage as large as the disk limit let the dd fill the memory, and then the agent
    # itself could not allocate and was OOM-killed (about 1 run in 8).
    limits = sandbox.spec.limits
    assert limits.disk_mib > limits.memory_mib  # the defaults this test is about
    fill = f"dd if=/dev/zero of=/tmp/fill bs=1M count={limits.disk_mib + 16}"
    result = await answered(sandbox.run(["sh", "-c", fill]))
    assert result.reason == "exited" and b"No space left" in result.stderr, result
    # With the storage full, commands still run and the agent still serves.
    for _ in range(3):
        again = await answered(sandbox.run(["python3", "-c", "print('ran')"]))
        assert again.reason == "exited" and again.stdout == b"ran\n", again
    assert (await answered(sandbox.stat("/tmp/fill"))).size > 0
    # The agent frees the space through a file operation, which needs no new process.
    await answered(sandbox.remove("/tmp/fill"))
    await assert_agent_serves(sandbox)


async def test_an_agent_that_cannot_set_oom_scores_refuses_to_start(
    settings: Settings, tmp_path: Path
) -> None:
    require_backend(settings, "namespace")
    # No /proc in its mount namespace: the agent cannot open its oom_score_adj.
    agent = await asyncio.create_subprocess_exec(
        *("bwrap", "--ro-bind", "/", "/", "--tmpfs", "/proc", "--dev", "/dev"),
        *("--bind", str(tmp_path), str(tmp_path)),
        *("/usr/bin/python3", "-E", "-s", "-S"),
        *(str(agent_source_dir() / "agent.py"), "--workdir", str(tmp_path)),
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await answered(agent.communicate())
    assert agent.returncode == 2
    assert b"cannot set oom_score_adj" in stderr and b"refusing to start" in stderr


# -- signals from inside the sandbox ----------------------------------------------------


async def test_every_signal_sandbox_code_sends_to_pid_1_is_ignored(sandbox: Sandbox) -> None:
    # Each signal three times, KILL and STOP included (`kill -n N`: bash takes a number).
    signals = " ".join(str(n) for n in range(1, signal.SIGRTMAX + 1))
    script = f"for round in 1 2 3; do for s in {signals}; do kill -n $s 1; done; done; echo sent"
    result = await answered(sandbox.run(["bash", "-c", script]))
    assert result.stdout == b"sent\n", result
    await assert_agent_serves(sandbox)
    again = await answered(sandbox.run(["bash", "-c", "kill -INT 1; kill -TERM 1; echo ok"]))
    assert again.stdout == b"ok\n"
    assert (await answered(sandbox.run(["echo", "still here"]))).stdout == b"still here\n"


# -- file operations never block the agent ----------------------------------------------


async def test_append_to_a_fifo_is_refused_and_blocks_nothing(sandbox: Sandbox) -> None:
    await sandbox.run(["mkfifo", "/tmp/fifo"])
    with pytest.raises(InvalidRequest, match="/tmp/fifo is a FIFO"):
        await answered(sandbox.write_file("/tmp/fifo", b"x", append=True))
    # With a reader at the other end the open would succeed: still refused, by fstat.
    # (Opened read-write, the reader stays open whatever the agent does to its end.)
    holder = "exec 3<>/tmp/fifo; echo ready; exec sleep 60"
    reader = await sandbox.exec(["sh", "-c", holder], background=True)
    assert (await answered(anext(aiter(reader)))).data == b"ready\n"
    with pytest.raises(InvalidRequest, match="/tmp/fifo is a FIFO"):
        await answered(sandbox.write_file("/tmp/fifo", b"x", append=True))
    await reader.kill()
    await assert_agent_serves(sandbox)


async def test_reads_of_what_is_not_a_regular_file_are_refused(sandbox: Sandbox) -> None:
    await sandbox.run(["mkfifo", "/tmp/fifo"])
    server = "import socket; s = socket.socket(socket.AF_UNIX); s.bind('/tmp/sock'); print(1)"
    assert (await sandbox.run(["python3", "-c", server])).stdout == b"1\n"
    for path, what in (
        ("/tmp/fifo", "a FIFO"),
        ("/dev/zero", "a device"),
        ("/tmp/sock", "a socket"),
    ):
        with pytest.raises(InvalidRequest, match=f"{path} is {what}"):
            await answered(sandbox.read_bytes(path))
    with pytest.raises(InvalidRequest, match="/tmp/sock is a socket"):
        await answered(sandbox.write_file("/tmp/sock", b"x", append=True))
    with pytest.raises(InvalidRequest, match="/dev/null is a device"):
        await answered(sandbox.write_file("/dev/null", b"x", append=True))
    with pytest.raises(IsADirectory):
        await answered(sandbox.read_bytes("/tmp"))
    await assert_agent_serves(sandbox)


async def test_moves_across_mounts_work_and_mount_points_stay(sandbox: Sandbox) -> None:
    """Found by the API fuzzer: both answered `internal` (EXDEV read as an agent too old,
    EBUSY unmapped). A move across mounts copies and removes, as mv does (see
    test_moves_and_kills); removing or moving a mount point is the caller's to change."""
    await answered(sandbox.write_file("/tmp/a.txt", b"a"))
    await answered(sandbox.rename("/tmp/a.txt", "/workspace/a.txt"))
    assert await answered(sandbox.read_bytes("/workspace/a.txt")) == b"a"
    with pytest.raises(InvalidRequest, match="mount point"):
        await answered(sandbox.remove("/"))
    with pytest.raises(PermissionDenied, match="may not remove it"):
        await answered(sandbox.rename("/workspace", "/tmp/w"))
    assert await answered(sandbox.read_bytes("/workspace/a.txt")) == b"a"
    await assert_agent_serves(sandbox)
