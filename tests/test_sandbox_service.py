"""The sandbox service is the only door to a live sandbox; the engine keeps its own books.

Real namespace sandboxes, a real engine and a real SQLite store: no mocks.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import corral.server
from corral.config import Settings
from corral.errors import FileNotFound, NotFound, SandboxNotRunning
from corral.guest import ExecResult, OutputChunk
from corral.isolation import Engine
from corral.sandboxes import CreateOptions, SandboxManager
from corral.sandboxes.commands import ExecEvent, Started
from corral.store import Store, Team
from tests.conftest import require_backend
from tests.kit.polling import until


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


# -- the doors ------------------------------------------------------------------------------


def test_the_api_server_never_takes_the_engine_sandbox() -> None:
    """Handlers call the service (`manager.commands`, `manager.files`, …): none takes the
    engine's Sandbox (`manager.running`) to drive it, merges environments or records
    activity itself."""
    offenders = []
    for path in sorted(Path(corral.server.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("running", "envs", "touch")
                and ast.unparse(node.value).endswith("manager")
            ):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


# -- the engine's bookkeeping ---------------------------------------------------------------


@pytest.mark.sandbox
async def test_engine_sandboxes_is_read_only_and_forgets_a_destroyed_sandbox(
    engine: Engine, settings: Settings
) -> None:
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace")
    try:
        assert engine.sandboxes[box.id] is box
        with pytest.raises(TypeError):  # only the engine changes its books
            engine.sandboxes[box.id] = box  # type: ignore[index]
        with pytest.raises(AttributeError):
            engine.sandboxes.pop(box.id)  # type: ignore[attr-defined]
    finally:
        await box.destroy()
    # Whoever destroys it, the engine no longer counts it: no one pops it by hand.
    assert box.id not in engine.sandboxes and len(engine.sandboxes) == 0


# -- commands: manager.commands -------------------------------------------------------------


async def _events(stream: AsyncIterator[ExecEvent]) -> list[ExecEvent]:
    return [event async for event in stream]


def _output(events: list[ExecEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, OutputChunk))


@pytest.mark.sandbox
async def test_exec_streams_start_output_and_end_under_the_sandbox_environment(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions(envs={"A": "sandbox", "B": "sandbox"}))
    stream = manager.commands.exec(
        team, record.id, ["sh", "-c", "echo $A $B; echo oops >&2"], envs={"B": "command"}
    )
    events = await _events(stream)
    start, end = events[0], events[-1]
    assert isinstance(start, Started) and start.pid > 0
    assert isinstance(end, ExecResult) and (end.exit_code, end.reason) == (0, "exited")
    assert _output(events) in (b"sandbox command\noops\n", b"oops\nsandbox command\n")
    stdout = [e for e in events if isinstance(e, OutputChunk) and e.stream == "stdout"]
    assert b"".join(e.data for e in stdout) == b"sandbox command\n"
    assert len(manager.commands.attached) == 0  # an ended command is no longer attached


@pytest.mark.sandbox
async def test_an_attached_command_takes_stdin_until_it_ends(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    stream = manager.commands.exec(team, record.id, ["cat"], stdin=True)
    async with contextlib.aclosing(stream):
        start = await anext(stream)
        assert isinstance(start, Started)
        await manager.commands.send_input(team, record.id, start.pid, b"hello\n")
        echoed = await anext(stream)
        assert isinstance(echoed, OutputChunk) and echoed.data == b"hello\n"
        await manager.commands.close_input(team, record.id, start.pid)
        end = await anext(stream)
        assert isinstance(end, ExecResult) and end.exit_code == 0
    with pytest.raises(NotFound, match=f"process {start.pid} is not running"):
        await manager.commands.send_input(team, record.id, start.pid, b"late\n")


@pytest.mark.sandbox
async def test_manager_input_reaches_a_command_no_stream_follows(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    stream = manager.commands.exec(team, record.id, ["cat"], stdin=True, background=True)
    async with contextlib.aclosing(stream):
        start = await anext(stream)
        assert isinstance(start, Started)
    assert len(manager.commands.attached) == 0  # nothing follows it any more
    await manager.commands.send_input(team, record.id, start.pid, b"kept\n")
    attached = manager.commands.attach(team, record.id, start.pid)
    async with contextlib.aclosing(attached):
        assert isinstance(await anext(attached), Started)
        await manager.commands.send_input(team, record.id, start.pid, b"after\n")
        seen = b""
        while not seen.endswith(b"after\n"):
            echoed = await anext(attached)
            assert isinstance(echoed, OutputChunk)
            seen += echoed.data
        # "kept" was echoed while nothing followed (dropped), unless cat was slower.
        assert seen in (b"after\n", b"kept\nafter\n")
    await manager.commands.close_input(team, record.id, start.pid)

    async def gone() -> bool:
        running = await manager.commands.processes(team, record.id)
        return start.pid not in [p.pid for p in running]

    await until(gone, "cat to end once its input is closed")
    with pytest.raises(NotFound, match=f"process {start.pid} is not running"):
        await manager.commands.send_input(team, record.id, start.pid, b"late\n")
    with pytest.raises(NotFound, match=f"process {start.pid} is not running"):
        await manager.commands.close_input(team, record.id, start.pid)


@pytest.mark.sandbox
async def test_signal_reaches_an_attached_command_and_a_detached_one(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    attached = manager.commands.exec(team, record.id, ["sleep", "30"])
    async with contextlib.aclosing(attached):
        start = await anext(attached)
        assert isinstance(start, Started)
        await manager.commands.signal(team, record.id, start.pid, signal.SIGKILL)
        end = await anext(attached)
        # Through the attached command: a kill asked for is "killed", not an OOM kill.
        assert isinstance(end, ExecResult) and end.reason == "killed"
        assert end.signal == signal.SIGKILL
    background = manager.commands.exec(team, record.id, ["sleep", "30"], background=True)
    async with contextlib.aclosing(background):
        start = await anext(background)
        assert isinstance(start, Started)
    # The stream is closed: the background command runs on, no longer attached.
    pids = [p.pid for p in await manager.commands.processes(team, record.id)]
    assert start.pid in pids and len(manager.commands.attached) == 0
    await manager.commands.signal(team, record.id, start.pid, signal.SIGKILL)

    async def gone() -> bool:
        return start.pid not in [p.pid for p in await manager.commands.processes(team, record.id)]

    await until(gone, "the command is gone")


@pytest.mark.sandbox
async def test_closing_an_exec_stream_or_losing_the_client_kills_a_foreground_command(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    client_gone = asyncio.Event()
    watched = manager.commands.exec(team, record.id, ["sleep", "30"], client_gone=client_gone)
    async with contextlib.aclosing(watched):
        assert isinstance(await anext(watched), Started)
        client_gone.set()  # the client went away while the command printed nothing
        end = await anext(watched)
        assert isinstance(end, ExecResult) and end.reason == "killed"
    closed = manager.commands.exec(team, record.id, ["sleep", "30"])
    async with contextlib.aclosing(closed):
        start = await anext(closed)
        assert isinstance(start, Started)

    async def gone() -> bool:
        return start.pid not in [p.pid for p in await manager.commands.processes(team, record.id)]

    await until(gone, "the command is gone")
    assert len(manager.commands.attached) == 0


# -- files: manager.files -------------------------------------------------------------------


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.sandbox
async def test_files_write_read_list_stat_mkdir_move_remove(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    files = manager.files
    assert await files.make_dir(team, record.id, "data/deep") is True
    assert await files.make_dir(team, record.id, "data/deep") is False
    info = await files.write_file(
        team, record.id, "data/a.txt", _chunks(b"hello ", b"world"), mode=0o600
    )
    assert (info.name, info.type, info.size, info.mode & 0o777) == ("a.txt", "file", 11, 0o600)
    await files.write_file(team, record.id, "data/a.txt", _chunks(b"!"), append=True)
    read = b"".join([c async for c in files.read_file(team, record.id, "data/a.txt")])
    assert read == b"hello world!"
    part = [c async for c in files.read_file(team, record.id, "data/a.txt", offset=6, length=5)]
    assert b"".join(part) == b"world"
    assert (await files.stat(team, record.id, "data/a.txt")).size == 12
    names = sorted(e.name for e in await files.list_dir(team, record.id, "data"))
    assert names == ["a.txt", "deep"]
    moved = await files.move(team, record.id, "data/a.txt", "data/deep/b.txt")
    assert moved is not None and moved.path.endswith("data/deep/b.txt")
    await files.remove(team, record.id, "data", recursive=True)
    with pytest.raises(FileNotFound):
        await files.stat(team, record.id, "data")


@pytest.mark.sandbox
async def test_commands_and_files_check_the_team_and_the_state(
    manager: SandboxManager, team: Team, store: Store
) -> None:
    record = await manager.create(team, CreateOptions())
    rival = store.create_team("rival")
    refused = [
        _events(manager.commands.exec(rival, record.id, ["true"])),
        manager.commands.send_input(rival, record.id, 1, b""),
        manager.commands.close_input(rival, record.id, 1),
        manager.commands.signal(rival, record.id, 1, signal.SIGTERM),
        manager.commands.processes(rival, record.id),
        manager.files.stat(rival, record.id, "/"),
        manager.files.list_dir(rival, record.id, "/"),
        manager.files.make_dir(rival, record.id, "x"),
        manager.files.remove(rival, record.id, "x"),
        manager.files.move(rival, record.id, "x", "y"),
        manager.files.write_file(rival, record.id, "x", _chunks(b"x")),
    ]
    for call in refused:
        with pytest.raises(NotFound, match=f"no sandbox '{record.id}'"):
            await call
    with pytest.raises(NotFound, match=f"no sandbox '{record.id}'"):
        await anext(manager.files.read_file(rival, record.id, "x"))
    await manager.pause(team, record.id)
    with pytest.raises(SandboxNotRunning, match="is paused; resume it first"):
        await manager.files.stat(team, record.id, "/")
    with pytest.raises(SandboxNotRunning, match="is paused; resume it first"):
        await anext(manager.commands.exec(team, record.id, ["true"]))
