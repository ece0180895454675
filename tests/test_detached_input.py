"""Input to a command by pid, whether or not anything follows it: the agent's `input`
op and Corral's SDK over a real server (the manager's part is in test_sandbox_service).

E2B's envd keeps a process's stdin open after the stream that started it is gone, and a
user who starts `cat` in the background, disconnects, then writes to it expects the
bytes to arrive: input goes to the command, not to a stream following it.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from corral import AsyncSandbox
from corral.errors import CommandError, InvalidRequest
from corral.guest import GuestConnection, protocol
from tests import test_e2b_process as e2b
from tests.conftest import LiveServer, opts
from tests.kit.polling import until, wait_until
from tests.test_guest import running_agent

MiB = 1 << 20


async def _gone(guest: GuestConnection, pid: int) -> bool:
    return pid not in [p.pid for p in await guest.processes()]


# -- the agent ------------------------------------------------------------------------------


@pytest.mark.integration
async def test_input_reaches_a_detached_background_command(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        guest = agent.guest
        cat = await guest.exec("cat > copy", stdin=True, background=True)
        await cat.detach()
        await guest.write_input(cat.pid, b"written ")
        await guest.write_input(cat.pid, b"while nobody followed it\n")
        await guest.close_input(cat.pid)
        await until(lambda: _gone(guest, cat.pid), "cat to end at the end of its input")
        assert (tmp_path / "copy").read_bytes() == b"written while nobody followed it\n"


@pytest.mark.integration
async def test_input_by_pid_and_by_the_following_channel_keep_their_order(
    tmp_path: Path,
) -> None:
    async with running_agent(tmp_path) as agent:
        guest = agent.guest
        cat = await guest.exec(["cat"], stdin=True)
        await cat.write_stdin(b"a")
        await guest.write_input(cat.pid, b"b")
        await cat.write_stdin(b"c")
        # More than the channel's window and more than one call's chunk, by pid: the
        # channel's credit still comes back for its own bytes only.
        big = bytes(range(256)) * (protocol.WINDOW // 128)
        reading = asyncio.ensure_future(cat.collect())
        await guest.write_input(cat.pid, big)
        await cat.write_stdin(b"d")
        await guest.close_input(cat.pid)
        stdout, _, result = await reading
        assert stdout == b"abc" + big + b"d" and result.ok


@pytest.mark.integration
async def test_input_to_a_pty_command_by_pid(tmp_path: Path) -> None:
    from corral.terminal import PtySize

    async with running_agent(tmp_path) as agent:
        guest = agent.guest
        shell = await guest.exec(["sh"], pty=PtySize(80, 24), background=True)
        await shell.detach()
        await guest.write_input(shell.pid, b"echo typed > typed; exit\n")
        await until(lambda: _gone(guest, shell.pid), "the shell to exit")
        assert (tmp_path / "typed").read_bytes() == b"typed\n"


@pytest.mark.integration
async def test_input_is_refused_where_it_cannot_go(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        guest = agent.guest
        sleeper = await guest.exec(["sleep", "30"], background=True)  # no stdin
        with pytest.raises(InvalidRequest, match="started without stdin"):
            await guest.write_input(sleeper.pid, b"x")
        with pytest.raises(InvalidRequest, match="started without stdin"):
            await guest.close_input(sleeper.pid)
        await sleeper.kill()
        await sleeper.wait()
        with pytest.raises(CommandError, match="not running"):
            await guest.write_input(sleeper.pid, b"x")

        deaf = await guest.exec(["sleep", "30"], stdin=True)  # lives on after its stdin
        await guest.close_input(deaf.pid)
        with pytest.raises(CommandError, match=f"the stdin of process {deaf.pid} is closed"):
            await guest.write_input(deaf.pid, b"late")
        await deaf.kill()
        assert (await deaf.wait()).reason == "killed"


@pytest.mark.integration
async def test_input_to_a_command_that_never_reads_waits_then_fails_at_its_end(
    tmp_path: Path,
) -> None:
    async with running_agent(tmp_path) as agent:
        guest = agent.guest
        sleeper = await guest.exec(["sleep", "30"], stdin=True, background=True)
        await sleeper.detach()
        writing = asyncio.ensure_future(guest.write_input(sleeper.pid, bytes(4 * MiB)))
        await asyncio.sleep(0.3)
        assert not writing.done()  # held until the pipe takes it: nothing piles up
        await guest.signal(sleeper.pid, 9, group=True)
        with pytest.raises(CommandError, match="bytes of input were not written"):
            await asyncio.wait_for(writing, 10)


# -- Corral's SDK ---------------------------------------------------------------------------


@pytest.mark.usefixtures("sandbox_host")
async def test_sdk_input_reaches_a_disconnected_background_command(server: LiveServer) -> None:
    async with await AsyncSandbox.create(**opts(server)) as sbx:
        handle = await sbx.commands.run("cat > copy", background=True)
        await handle.disconnect()
        await sbx.commands.send_stdin(handle.pid, "sent after disconnect\n")
        await sbx.commands.close_stdin(handle.pid)

        async def gone() -> bool:
            return handle.pid not in [p.pid for p in await sbx.commands.list()]

        await until(gone, "cat to end at the end of its input")
        assert await sbx.files.read("copy") == "sent after disconnect\n"


# -- E2B's envd (Connect JSON, as in test_e2b_process) --------------------------------------


def _e2b_pid_gone(server: LiveServer, box: str, pid: int) -> bool:
    return pid not in e2b.running_pids(server, box)


@pytest.mark.integration
@pytest.mark.sandbox
def test_e2b_input_reaches_a_process_after_its_start_stream_is_dropped(
    server: LiveServer, box: str
) -> None:
    with e2b.stream(server, box, "Start", {**e2b.bash("cat > copy"), "stdin": True}) as s:
        pid = e2b.started(s)
    selector = {"process": {"pid": pid}}
    data = base64.b64encode(b"after the stream\n").decode()
    e2b.ok(e2b.unary(server, box, "SendInput", {**selector, "input": {"stdin": data}}))
    e2b.ok(e2b.unary(server, box, "CloseStdin", selector))
    wait_until(lambda: _e2b_pid_gone(server, box, pid), "cat to end at the end of its input")
    with e2b.stream(server, box, "Start", e2b.bash("cat copy")) as s:
        assert e2b.output(s.rest()) == b"after the stream\n"


@pytest.mark.integration
@pytest.mark.sandbox
def test_e2b_pty_input_reaches_a_terminal_nobody_follows(server: LiveServer, box: str) -> None:
    start = {"process": {"cmd": "/bin/sh"}, "pty": {"size": {"cols": 80, "rows": 24}}}
    with e2b.stream(server, box, "Start", start) as s:
        pid = e2b.started(s)
    e2b.type_in(server, box, pid, b"echo typed > typed; exit\n")
    wait_until(lambda: _e2b_pid_gone(server, box, pid), "the shell to exit")
    with e2b.stream(server, box, "Start", e2b.bash("cat typed")) as s:
        assert e2b.output(s.rest()) == b"typed\n"
