"""Issue 9, finding 2 (the rest): the host's memory capacity is shared by every Corral
process of a runtime dir (the server and its `corral worker`s), and a sandbox refused for
room leaves no row behind.

Real sandboxes in real processes sharing one runtime dir, and a real SQLite store.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator

import pytest

from corral.config import Settings
from corral.errors import CapacityExceeded
from corral.isolation import Engine, Limits
from corral.isolation.engine import new_sandbox_id
from corral.sandboxes import CreateOptions, SandboxManager
from corral.states import SANDBOX_STATES
from corral.store import Store
from tests.conftest import require_backend, tiny_host
from tests.kit import processes

pytestmark = pytest.mark.sandbox

# Another Corral process: an engine that takes sandboxes of `memory_mib` (argv[1]), argv[2]
# of them at once, says how many it got, and holds them until a line on stdin, then
# destroys them, says so, and waits for another line to exit.
_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from corral.config import Settings
    from corral.errors import CapacityExceeded
    from corral.isolation import Engine, Limits

    async def main() -> None:
        mib, count = int(sys.argv[1]), int(sys.argv[2])
        async with Engine(Settings.from_env()) as engine:
            async def take():
                try:
                    return await engine.create(isolation="namespace", limits=Limits(memory_mib=mib))
                except CapacityExceeded:
                    return None
            boxes = [b for b in await asyncio.gather(*(take() for _ in range(count))) if b]
            print(f"held {len(boxes)}", flush=True)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sys.stdin.readline)
            for box in boxes:
                await box.destroy()
            print("ended", flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())
    """
)


class Holder:
    """A separate process with an engine on the same runtime dir, holding sandboxes."""

    def __init__(self, settings: Settings, memory_mib: int, count: int) -> None:
        env = {
            **os.environ,
            "CORRAL_RUNTIME_DIR": str(settings.runtime_dir),
            "CORRAL_CGROUP_PARENT": settings.cgroup_parent,
            "CORRAL_MEMORY_OVERCOMMIT": repr(settings.memory_overcommit),
            "CORRAL_MEMORY_RESERVE_MIB": str(settings.memory_reserve_mib),
        }
        self.process = processes.spawn(
            [sys.executable, "-c", _HOLDER, str(memory_mib), str(count)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def held(self) -> int:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("held "), f"holder said {line!r}; exit {self.process.poll()}"
        return int(line.split()[1])

    def end_sandboxes(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline() == "ended\n"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()  # waits, and closes its pipes


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.stop()


@pytest.fixture
def tiny(own_runtime: Settings) -> Settings:
    """A host with room for two sandboxes of 256 MiB, not three."""
    require_backend(own_runtime, "namespace")
    return tiny_host(own_runtime, 600)


async def off_loop(holder: Holder) -> int:
    return await asyncio.to_thread(holder.held)


async def holding(holders: list[Holder], settings: Settings, mib: int, count: int) -> Holder:
    """A Holder once it holds `count` sandboxes of `mib` MiB (stopped after the test)."""
    holders.append(holder := Holder(settings, mib, count))
    assert await off_loop(holder) == count
    return holder


QUARTER = Limits(memory_mib=256)


async def test_a_second_process_is_refused_while_the_first_holds_the_capacity(
    tiny: Settings, holders: list[Holder]
) -> None:
    """On main each process counted only its own sandboxes: this one was admitted."""
    first = await holding(holders, tiny, 256, 2)
    async with Engine(tiny) as engine:
        assert engine.committed_memory_mib() == 512
        with pytest.raises(CapacityExceeded, match="hold 512 MiB"):
            await engine.create(isolation="namespace", limits=QUARTER)
        assert len(list((tiny.runtime_dir / "sandboxes").glob("sb_*"))) == 2  # nothing left
        await asyncio.to_thread(first.end_sandboxes)
        assert engine.committed_memory_mib() == 0
        boxes = [await engine.create(isolation="namespace", limits=QUARTER) for _ in range(2)]
        assert all([(await box.run(["true"])).ok for box in boxes])


async def test_the_sandboxes_of_a_killed_process_stop_counting(
    tiny: Settings, holders: list[Holder]
) -> None:
    first = await holding(holders, tiny, 256, 2)
    async with Engine(tiny) as engine:
        with pytest.raises(CapacityExceeded):
            await engine.create(isolation="namespace", limits=QUARTER)
        first.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.process.wait)
        # Its records are orphans now, reaped or not: the whole capacity is free again.
        assert engine.committed_memory_mib() == 0
        boxes = [await engine.create(isolation="namespace", limits=QUARTER) for _ in range(2)]
        engine.reap()
        sandboxes = sorted(p.name for p in (tiny.runtime_dir / "sandboxes").glob("sb_*"))
        assert sandboxes == sorted(b.id for b in boxes)
        ledger = sorted(p.name.split(".")[0] for p in (tiny.runtime_dir / "memory").iterdir())
        assert ledger == sorted(b.id for b in boxes)


async def test_processes_admitting_at_once_never_pass_the_capacity(
    own_runtime: Settings, holders: list[Holder]
) -> None:
    """Two processes each ask for 4 x 64 MiB at once where 5 fit: 5 in all, never more."""
    require_backend(own_runtime, "namespace")
    settings = tiny_host(own_runtime, 5 * 64 + 30)
    holders.extend([Holder(settings, 64, 4), Holder(settings, 64, 4)])
    held = await asyncio.gather(*(off_loop(h) for h in holders))
    assert sum(held) == 5, held


# -- a refused create leaves no row ---------------------------------------------------------


@pytest.fixture
async def manager(tiny: Settings) -> AsyncIterator[SandboxManager]:
    store = Store.open(tiny)
    manager = SandboxManager(tiny, store, pool_size=0, tick=0.1)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.aclose()
        store.close()


async def all_rows(manager: SandboxManager, team_name: str) -> list[str]:
    team = manager.store.team(team_name)
    return [r.id for r in (await manager.list(team, states=SANDBOX_STATES))[0]]


async def test_a_create_refused_for_room_leaves_no_row(
    manager: SandboxManager, tiny: Settings, holders: list[Holder]
) -> None:
    """On main the row was written first and stayed, `failed`, in the team's list."""
    team = manager.store.create_team("roomless", max_memory_mib=4096)
    held = [await manager.create(team, CreateOptions(limits=QUARTER)) for _ in range(2)]
    with pytest.raises(CapacityExceeded):
        await manager.create(team, CreateOptions(limits=QUARTER))
    assert await all_rows(manager, "roomless") == [r.id for r in held]
    await manager.kill(team, held[0].id)
    # Room taken by another process refuses it just the same.
    other = await holding(holders, tiny, 256, 1)
    with pytest.raises(CapacityExceeded):
        await manager.create(team, CreateOptions(limits=QUARTER))
    assert await all_rows(manager, "roomless") == [r.id for r in held]
    await asyncio.to_thread(other.end_sandboxes)
    record = await manager.create(team, CreateOptions(limits=QUARTER))
    assert await all_rows(manager, "roomless") == [*(r.id for r in held), record.id]


async def test_a_create_refused_after_its_row_was_written_removes_the_row(
    manager: SandboxManager, tiny: Settings
) -> None:
    """The pre-check passes, then another process takes the room before the engine's own
    check (here: while this test holds the ledger's lock): the row goes again."""
    team = manager.store.create_team("raced", max_memory_mib=4096)
    lock = os.open(tiny.runtime_dir / "memory.lock", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        create = asyncio.create_task(manager.create(team, CreateOptions(limits=QUARTER)))
        while not await all_rows(manager, "raced"):
            assert not create.done(), create
            await asyncio.sleep(0.01)
        # What another process's admission would write meanwhile: the whole capacity.
        taken = manager.engine.ledger.record(new_sandbox_id(), 600)
    finally:
        os.close(lock)
    with pytest.raises(CapacityExceeded):
        await create
    assert await all_rows(manager, "raced") == []
    os.unlink(taken)
    record = await manager.create(team, CreateOptions(limits=QUARTER))
    assert await all_rows(manager, "raced") == [record.id]
