"""Commands on a pseudo-terminal, from the guest agent up to the sandbox service.

The agent runs for real: as a plain process (the agent-level tests, which reuse
tests/test_guest.py's `running_agent`) and inside real namespace sandboxes, as the
template's user and as root. No mocks: a shell on the terminal is driven by what it
prints, the way a person at a terminal would.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import errors
from corral.config import Settings
from corral.guest import ExecResult, GuestConnection, GuestProcess, OutputChunk
from corral.isolation import Command, Engine, Sandbox
from corral.limits import Limits
from corral.sandboxes import CreateOptions, SandboxManager
from corral.sandboxes.commands import ExecEvent, Started
from corral.store import Store, Team
from corral.terminal import PtySize
from tests.conftest import require_backend
from tests.kit.polling import until
from tests.test_guest import running_agent

WAIT = 20.0  # seconds a shell may take to answer on a loaded machine


class Screen:
    """What a terminal showed: the output events of one stream, read in the background."""

    def __init__(self, source: AsyncIterator[ExecEvent] | GuestProcess | Command) -> None:
        """`source`: a manager's event stream, or a process (its chunks, then `wait`)."""
        self.text = ""
        self.result: ExecResult | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read(source))

    async def _read(self, source: AsyncIterator[ExecEvent] | GuestProcess | Command) -> None:
        async for event in source:
            if isinstance(event, OutputChunk):
                assert event.stream == "stdout"  # a terminal is one stream
                self.text += event.data.decode(errors="replace")
            elif isinstance(event, ExecResult):
                self.result = event
            self._changed.set()
        if not isinstance(source, AsyncIterator):
            self.result = await source.wait()
        self._changed.set()

    async def expect(self, pattern: str, start: int = 0) -> re.Match[str]:
        """Wait until the output from `start` on matches `pattern` (a regex)."""

        async def seen() -> re.Match[str]:
            while (match := re.compile(pattern, re.S).search(self.text, start)) is None:
                if self._task.done():
                    self._task.result()  # raises what ended it
                    raise AssertionError(f"ended without {pattern!r}: {self.text!r}")
                self._changed.clear()
                await self._changed.wait()
            return match

        try:
            return await asyncio.wait_for(seen(), WAIT)
        except TimeoutError:
            raise AssertionError(f"no {pattern!r} within {WAIT} s in {self.text!r}") from None

    async def end(self) -> ExecResult:
        try:
            await asyncio.wait_for(asyncio.shield(self._task), WAIT)
        except TimeoutError:
            raise AssertionError(f"no end within {WAIT} s: {self.text!r}") from None
        assert self.result is not None
        return self.result

    async def close(self) -> None:
        """Stop reading (the stream itself is the caller's to close)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def sleeping_in_session(sid: int) -> bool:
    """Whether a `sleep` runs in session `sid` (the agent runs on this host here)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            name, rest = stat.read_text().rsplit(")", 1)
            if name.endswith("(sleep") and int(rest.split()[3]) == sid:
                return True
    return False


# -- the guest agent ------------------------------------------------------------------------


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[GuestConnection]:
    async with running_agent(tmp_path) as agent:
        yield agent.guest


async def test_a_pty_command_runs_on_a_terminal_of_its_size(guest: GuestConnection) -> None:
    script = 'test -t 0 && test -t 1 && echo "tty=$(tty)"; echo "size=$(stty size) term=$TERM"'
    process = await guest.exec(["sh", "-c", script], pty=PtySize(cols=91, rows=17))
    out, err, result = await process.collect()
    assert (result.exit_code, result.reason, err) == (0, "exited", b"")
    text = out.decode()
    assert re.search(r"tty=/dev/pts/\d+", text), text  # isatty, and it is the terminal
    assert "size=17 91 term=xterm-256color" in text
    assert "\r\n" in text  # the line discipline's output processing, as on a terminal


async def test_a_pty_command_may_set_its_own_term(guest: GuestConnection) -> None:
    process = await guest.exec("echo $TERM", pty=PtySize(80, 24), env={"TERM": "vt100"})
    out, _err, _result = await process.collect()
    assert out == b"vt100\r\n"


async def test_resize_ctrl_c_and_exit_in_an_interactive_shell(guest: GuestConnection) -> None:
    process = await guest.exec(
        ["bash", "--norc", "-i"], pty=PtySize(80, 24), env={"PS1": "ready> "}
    )
    screen = Screen(process)
    try:
        await process.write_stdin(b'echo "cols=$(tput cols)"\n')
        await screen.expect(r"cols=80\r\n")
        await guest.resize(process.pid, PtySize(cols=132, rows=40))
        # SIGWINCH went to the shell (the foreground job): it updates COLUMNS itself.
        await process.write_stdin(b'echo "size=$(stty size) now=$(tput cols) $COLUMNS"\n')
        await screen.expect(r"size=40 132 now=132 132\r\n")

        mark = len(screen.text)
        await process.write_stdin(b"sleep 60; echo woke-$((6*7))\n")
        await until(lambda: sleeping_in_session(process.pid), "sleep to run in the shell")
        mark = len(screen.text)
        await process.write_stdin(b"\x03")  # Ctrl-C: SIGINT for the foreground job only
        await screen.expect(r"\^C.*ready> ", mark)  # (it also drops input typed ahead)
        await process.write_stdin(b'echo "alive $?"\n')
        await screen.expect(r"alive 130\r\n", mark)  # the shell lives; sleep died of SIGINT
        assert "woke-42" not in screen.text[mark:]  # the rest of the line did not run

        await process.write_stdin(b"exit\n")
        result = await screen.end()
        assert (result.exit_code, result.reason) == (0, "exited")
    finally:
        await screen.close()
        with contextlib.suppress(errors.CorralError):
            await process.kill()


async def test_resize_refuses_a_command_without_a_terminal_and_an_unknown_pid(
    guest: GuestConnection,
) -> None:
    process = await guest.exec(["sleep", "30"])
    try:
        with pytest.raises(errors.InvalidRequest, match="has no terminal to resize"):
            await guest.resize(process.pid, PtySize(80, 24))
    finally:
        await process.kill()
    await process.wait()
    with pytest.raises(errors.CommandError, match="not running"):
        await guest.resize(process.pid, PtySize(80, 24))
    with pytest.raises(errors.InvalidRequest, match=r"terminal size is 1\.\.65535 cells"):
        PtySize(0, 24)


async def test_a_background_command_keeps_its_input_across_a_detach(
    guest: GuestConnection,
) -> None:
    """The agent keeps a detached background command's stdin (and terminal) for the next
    one to attach: E2B's terminals are reconnected this way."""
    process = await guest.exec(["cat"], pty=PtySize(80, 24), background=True)
    await process.detach()
    again = await guest.attach(process.pid)
    screen = Screen(again)
    try:
        await again.write_stdin(b"still here\n")
        await screen.expect(r"still here\r\n")
        await again.write_stdin(b"\x04")  # Ctrl-D at the start of a line: cat reads EOF
        assert (await screen.end()).exit_code == 0
    finally:
        await screen.close()
        with contextlib.suppress(errors.CorralError):
            await again.kill()


# -- namespace sandboxes --------------------------------------------------------------------


@pytest.mark.sandbox
@pytest.mark.parametrize("user", [None, "root"])
async def test_a_pty_shell_in_a_sandbox_as_its_user_and_as_root(
    sandbox: Sandbox, user: str | None
) -> None:
    command = await sandbox.exec(["bash", "-i", "-l"], pty=PtySize(80, 24), user=user)
    screen = Screen(command)
    try:
        await command.write_stdin(b'echo "who=$(id -u) on=$(tty) cols=$(tput cols)"\n')
        uid = "0" if user == "root" else "1000"
        await screen.expect(rf"who={uid} on=/dev/pts/\d+ cols=80\r\n")
        await sandbox.resize(command.pid, PtySize(100, 30))
        await command.write_stdin(b'echo "cols=$(tput cols)"; exit 7\n')
        await screen.expect(r"cols=100\r\n")
        result = await screen.end()
        assert (result.exit_code, result.reason) == (7, "exited")
    finally:
        await screen.close()
        with contextlib.suppress(errors.CorralError):
            await command.kill()


@pytest.mark.sandbox
async def test_a_terminal_has_no_default_output_limit(engine: Engine, settings: Settings) -> None:
    """The sandbox's output cap is for collected output; a terminal session streams."""
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace", limits=Limits(output_bytes=1000))
    try:
        script = "head -c 3000 /dev/zero | tr '\\0' x; echo"
        piped = await box.exec(["sh", "-c", script])
        assert (await piped.collect()).reason == "output_limit"
        command = await box.exec(["sh", "-c", script], pty=PtySize(80, 24))
        result = await command.collect()
        assert (result.reason, result.stdout.count(b"x")) == ("exited", 3000)
        capped = await box.exec(["sh", "-c", script], pty=PtySize(80, 24), output_limit=100)
        assert (await capped.collect()).reason == "output_limit"
    finally:
        await box.destroy()


# -- the sandbox service: exec with a pty, attach -------------------------------------------


@pytest.fixture
async def manager(
    settings: Settings, store: Store, engine: Engine
) -> AsyncIterator[SandboxManager]:
    require_backend(settings, "namespace")
    manager = SandboxManager(settings, store, engine=engine, pool_size=0)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.aclose()


@pytest.fixture
def team(store: Store) -> Team:
    return store.create_team("acme")


async def _started(stream: AsyncIterator[ExecEvent]) -> int:
    start = await anext(stream)
    assert isinstance(start, Started) and start.pid > 0
    return start.pid


@pytest.mark.sandbox
async def test_manager_pty_exec_takes_input_and_resizes(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    stream = manager.commands.exec(team, record.id, ["bash", "-i"], pty=PtySize(80, 24))
    async with contextlib.aclosing(stream):
        pid = await _started(stream)
        screen = Screen(stream)
        try:
            # No `stdin=True`: a terminal always takes input.
            await manager.commands.send_input(team, record.id, pid, b'echo "c=$(tput cols)"\n')
            await screen.expect(r"c=80\r\n")
            await manager.commands.resize(team, record.id, pid, 120, 50)
            await manager.commands.send_input(
                team, record.id, pid, b'echo "c=$(tput cols)"; exit\n'
            )
            await screen.expect(r"c=120\r\n")
            assert (await screen.end()).exit_code == 0
        finally:
            await screen.close()
    with pytest.raises(errors.NotFound, match="no running process"):
        await manager.commands.resize(team, record.id, pid, 80, 24)


@pytest.mark.sandbox
async def test_two_attachers_get_later_output_and_the_end(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    script = "read line; echo got $line; read line; echo got $line; exit 5"
    owner = manager.commands.exec(team, record.id, ["sh", "-c", script], stdin=True)
    async with contextlib.aclosing(owner):
        pid = await _started(owner)
        first = Screen(owner)
        await manager.commands.send_input(team, record.id, pid, b"one\n")
        await first.expect("got one\n")
        attachers = [manager.commands.attach(team, record.id, pid) for _ in range(2)]
        try:
            for attacher in attachers:
                assert await _started(attacher) == pid
            late = [Screen(attacher) for attacher in attachers]
            await manager.commands.send_input(team, record.id, pid, b"two\n")
            for screen in (first, *late):
                await screen.expect("got two\n")
                assert (await screen.end()).exit_code == 5
            # From now on: an attacher never sees what came before it attached.
            assert all("one" not in screen.text for screen in late)
        finally:
            for attacher in attachers:
                await attacher.aclose()
    assert len(manager.commands.attached) == 0
    with pytest.raises(errors.NotFound, match=f"no running process {pid}"):
        await anext(manager.commands.attach(team, record.id, pid))
    with pytest.raises(errors.NotFound, match="no running process 999999"):
        await anext(manager.commands.attach(team, record.id, 999999))


@pytest.mark.sandbox
async def test_a_background_pty_survives_its_stream_and_takes_a_reattach(
    manager: SandboxManager, team: Team
) -> None:
    """E2B's terminal reconnect: the first stream is dropped, a new one attaches, input
    reaches the same shell, and the end reaches the new stream."""
    record = await manager.create(team, CreateOptions(envs={"FOO": "bar"}))
    first = manager.commands.exec(
        team, record.id, ["bash", "-i", "-l"], pty=PtySize(80, 24), background=True
    )
    async with contextlib.aclosing(first):
        pid = await _started(first)
        screen = Screen(first)
        await manager.commands.send_input(team, record.id, pid, b'echo "v=$FOO"\n')
        await screen.expect(r"v=bar\r\n")
        await screen.close()
    assert len(manager.commands.attached) == 0  # nobody follows it now
    assert pid in [p.pid for p in await manager.commands.processes(team, record.id)]

    again = manager.commands.attach(team, record.id, pid)
    async with contextlib.aclosing(again):
        assert await _started(again) == pid
        screen = Screen(again)
        await manager.commands.send_input(team, record.id, pid, b'echo "w=$FOO"; exit\n')
        await screen.expect(r"w=bar\r\n")
        assert (await screen.end()).exit_code == 0


@pytest.mark.sandbox
async def test_an_attacher_leaving_never_stops_the_command_and_the_owner_leaving_kills_it(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    owner = manager.commands.exec(team, record.id, ["sleep", "60"])
    async with contextlib.aclosing(owner):
        pid = await _started(owner)
        attacher = manager.commands.attach(team, record.id, pid)
        async with contextlib.aclosing(attacher):
            await _started(attacher)
        watcher = manager.commands.attach(team, record.id, pid)
        async with contextlib.aclosing(watcher):
            await _started(watcher)
            assert pid in [p.pid for p in await manager.commands.processes(team, record.id)]
            await owner.aclose()  # the foreground command dies with its exec's stream
            end = None
            async for event in watcher:
                end = event
            assert isinstance(end, ExecResult) and end.signal == signal.SIGKILL
    assert len(manager.commands.attached) == 0
