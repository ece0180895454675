"""The sandbox manager with real namespace sandboxes and a real SQLite store: no mocks."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import (
    InvalidLimits,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    SandboxNotRunning,
    UnknownTemplate,
)
from corral.isolation import Limits
from corral.isolation.footprint import process_start_time
from corral.sandboxes import CreateOptions, SandboxManager
from corral.sandboxes.lifecycle import ORPHANED
from corral.store import MetricPoint, Store, Team
from tests.conftest import (
    TEST_CGROUP_PARENT,
    StartManager,
    cgroup_dirs,
    host_processes_of_uid,
    new_sandbox_row,
    slot_ids,
)
from tests.kit import processes
from tests.kit.polling import until

pytestmark = pytest.mark.sandbox


@pytest.fixture
def team(store: Store) -> Team:
    return store.create_team("acme", max_sandboxes=5, max_memory_mib=4096)


@pytest.fixture
def other(store: Store) -> Team:
    return store.create_team("rival")


@pytest.fixture
async def manager(managers: StartManager) -> SandboxManager:
    return await managers()


def _transitions(store: Store, sandbox_id: str) -> list[tuple[str | None, str]]:
    return [(e.from_state, e.to_state) for e in store.events(sandbox_id)]


def calls_on(manager: SandboxManager, team: Team, sandbox_id: str) -> list[Awaitable[object]]:
    """Every call of `team` that acts on a live sandbox (not yet awaited)."""
    return [
        manager.kill(team, sandbox_id),
        manager.pause(team, sandbox_id),
        manager.resume(team, sandbox_id),
        manager.set_timeout(team, sandbox_id, 60),
        manager.ping(team, sandbox_id),
        manager.running(team, sandbox_id),
    ]


def _state(store: Store, sandbox_id: str) -> tuple[str, str]:
    row = store.sandbox(sandbox_id)
    assert row is not None
    return row.state, row.state_reason


# -- create, get, list ------------------------------------------------------------------


async def test_create_get_and_run_a_command(
    manager: SandboxManager, team: Team, store: Store
) -> None:
    options = CreateOptions(
        limits=Limits(memory_mib=256), envs={"GREETING": "hi"}, metadata={"app": "web"}
    )
    record = await manager.create(team, options)
    assert record.state == "running" and record.state_reason == "created"
    assert record.isolation == "namespace" and record.team_id == team.id
    assert record.limits.memory_mib == 256 and record.metadata == {"app": "web"}
    assert record.expires_at - record.created_at == timedelta(seconds=300)
    assert record.created_at.tzinfo is UTC
    assert await manager.get(team, record.id) == record
    assert manager.envs(record.id) == {"GREETING": "hi"}
    box = await manager.running(team, record.id)
    result = await box.run(["sh", "-c", "echo $GREETING"])
    assert result.stdout == b"hi\n"
    assert _transitions(store, record.id) == [(None, "creating"), ("creating", "running")]


async def test_list_filters_by_state_and_metadata(manager: SandboxManager, team: Team) -> None:
    web = await manager.create(team, CreateOptions(metadata={"app": "web", "env": "prod"}))
    db = await manager.create(team, CreateOptions(metadata={"app": "db.x", "env": "prod"}))
    odd = await manager.create(team, CreateOptions(metadata={"a.b $[0]": "ü 'x' \"y\""}))
    paused = await manager.pause(team, db.id)

    async def ids(**kwargs: object) -> list[str]:
        records, token = await manager.list(team, **kwargs)  # type: ignore[arg-type]
        assert token == ""
        return [r.id for r in records]

    assert await ids(metadata={"a.b $[0]": "ü 'x' \"y\""}) == [odd.id]
    await manager.kill(team, odd.id)
    assert await ids() == [web.id, db.id]
    assert await ids(states=["paused"]) == [paused.id]
    assert await ids(metadata={"env": "prod"}) == [web.id, db.id]
    assert await ids(metadata={"app": "db.x"}) == [db.id]
    assert await ids(metadata={"app": "web", "env": "dev"}) == []
    assert await ids(metadata={"missing": "x"}) == []
    await manager.kill(team, web.id)
    assert await ids() == [db.id]
    assert await ids(states=["killed"]) == [web.id, odd.id]


async def test_list_pages_with_tokens(manager: SandboxManager, team: Team) -> None:
    created = [(await manager.create(team, CreateOptions())).id for _ in range(3)]
    first, token = await manager.list(team, page_size=2)
    assert [r.id for r in first] == created[:2] and token
    second, last = await manager.list(team, page_size=2, page_token=token)
    assert [r.id for r in second] == created[2:] and last == ""
    for bad in ("garbage", "e30", token[:-3]):
        with pytest.raises(InvalidRequest, match="page_token is invalid"):
            await manager.list(team, page_token=bad)
    for size in (0, 1001):
        with pytest.raises(InvalidRequest, match="page_size"):
            await manager.list(team, page_size=size)
    with pytest.raises(InvalidRequest, match="unknown states"):
        await manager.list(team, states=["zombie"])
    with pytest.raises(InvalidRequest, match="printable ASCII"):
        await manager.list(team, metadata={'"': "x"})


async def test_bad_options_are_refused_and_create_nothing(
    manager: SandboxManager, team: Team
) -> None:
    for kwargs in (
        {"timeout_seconds": 0},
        {"timeout_seconds": 86_401},
        {"idle_timeout_seconds": -1},
        {"on_idle": "explode"},
        {"envs": {"A=B": "x"}},
        {"metadata": {"": "x"}},
        {"metadata": {"naïve": "x"}},
        {"metadata": {"k": "x" * 513}},
    ):
        with pytest.raises(InvalidRequest):
            CreateOptions(**kwargs)
    with pytest.raises(UnknownTemplate):
        await manager.create(team, CreateOptions(template="nope"))
    with pytest.raises(InvalidLimits):
        await manager.create(team, CreateOptions(limits=Limits(cpu=1000)))
    assert await manager.list(team, states=["creating", "running", "failed"]) == ([], "")


# -- lifecycle ----------------------------------------------------------------------------


async def test_pause_resume_kill_record_events_in_order(
    manager: SandboxManager, team: Team, store: Store, msettings: Settings
) -> None:
    record = await manager.create(team, CreateOptions())
    paused = await manager.pause(team, record.id)
    assert (paused.state, paused.state_reason) == ("paused", "paused: by request")
    with pytest.raises(SandboxNotRunning, match="is paused; resume it first"):
        await manager.running(team, record.id)
    resumed = await manager.resume(team, record.id)
    assert (resumed.state, resumed.state_reason) == ("running", "resumed")
    assert (await (await manager.running(team, record.id)).run(["true"])).ok
    await manager.kill(team, record.id)
    assert _state(store, record.id) == ("killed", "killed: by request")
    assert _transitions(store, record.id) == [
        (None, "creating"),
        ("creating", "running"),
        ("running", "paused"),
        ("paused", "running"),
        ("running", "killed"),
    ]
    assert not (msettings.runtime_dir / "sandboxes" / record.id).exists()
    assert not cgroup_dirs(record.id)


async def test_illegal_transitions_are_refused_and_change_nothing(
    manager: SandboxManager, team: Team, store: Store
) -> None:
    record = await manager.create(team, CreateOptions())
    with pytest.raises(InvalidRequest, match=r"cannot resume .* it is running"):
        await manager.resume(team, record.id)
    await manager.pause(team, record.id)
    with pytest.raises(InvalidRequest, match=r"cannot pause .* it is paused"):
        await manager.pause(team, record.id)
    assert _state(store, record.id) == ("paused", "paused: by request")
    assert len(store.events(record.id)) == 3
    await manager.kill(team, record.id)
    events = store.events(record.id)
    for call in calls_on(manager, team, record.id):
        with pytest.raises(SandboxNotRunning, match="is killed"):
            await call
    assert store.events(record.id) == events
    assert (await manager.get(team, record.id)).state == "killed"


async def test_teams_never_see_each_others_sandboxes(
    manager: SandboxManager, team: Team, other: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    with pytest.raises(NotFound) as unknown:
        await manager.get(other, "sb_00000000000000000000")
    calls = [
        manager.get(other, record.id),
        *calls_on(manager, other, record.id),
        manager.metrics(other, record.id, "10m"),
    ]
    for call in calls:
        with pytest.raises(NotFound) as refused:
            await call
        assert str(refused.value) == str(unknown.value).replace(
            "sb_00000000000000000000", record.id
        )
    assert await manager.list(other) == ([], "")
    assert (await manager.get(team, record.id)).state == "running"


async def test_quotas_refuse_with_the_limit_and_the_figure(
    manager: SandboxManager, store: Store
) -> None:
    small = store.create_team("small", max_sandboxes=2, max_memory_mib=1024)
    first = await manager.create(small, CreateOptions())
    await manager.create(small, CreateOptions())
    with pytest.raises(QuotaExceeded, match=r"has 2 live .* allows 2 \(max_sandboxes\)"):
        await manager.create(small, CreateOptions())
    assert len((await manager.list(small, states=["creating", "running", "failed"]))[0]) == 2
    await manager.kill(small, first.id)
    with pytest.raises(QuotaExceeded, match=r"memory_mib=1024 .* hold 512 of 1024 MiB"):
        await manager.create(small, CreateOptions(limits=Limits(memory_mib=1024)))
    await manager.create(small, CreateOptions())  # a killed one no longer counts


# -- timers -------------------------------------------------------------------------------


async def test_lifetime_timeout_kills_and_set_timeout_moves_it(
    manager: SandboxManager, team: Team, store: Store
) -> None:
    short = await manager.create(team, CreateOptions(timeout_seconds=1))
    extended = await manager.create(team, CreateOptions(timeout_seconds=1))
    moved = await manager.set_timeout(team, extended.id, 30)
    assert moved.expires_at > extended.expires_at + timedelta(seconds=25)
    with pytest.raises(InvalidRequest, match="timeout_seconds"):
        await manager.set_timeout(team, extended.id, 0)
    await until(lambda: _state(store, short.id)[0] == "killed", "the timeout to kill it")
    assert _state(store, short.id) == ("killed", "killed: timeout")
    assert (await manager.get(team, extended.id)).state == "running"


async def test_idle_sandboxes_pause_unless_pinged(
    manager: SandboxManager, team: Team, store: Store
) -> None:
    options = CreateOptions(idle_timeout_seconds=1)
    idle = await manager.create(team, options)
    pinged = await manager.create(team, options)
    streaming = await manager.create(team, options)

    async def idle_paused_while_the_others_are_busy() -> bool:
        await manager.ping(team, pinged.id)
        manager.touch(streaming.id)
        return _state(store, idle.id)[0] == "paused"

    await until(idle_paused_while_the_others_are_busy, "the idle one to pause", interval=0.2)
    assert _state(store, idle.id) == ("paused", "paused: idle for 1s")
    assert _state(store, pinged.id)[0] == "running"
    assert _state(store, streaming.id)[0] == "running"
    resumed = await manager.resume(team, idle.id)  # resuming is activity: the timer restarts
    assert resumed.state == "running"
    assert resumed.last_activity_at > datetime.now(UTC) - timedelta(seconds=0.5)


async def test_idle_sandboxes_can_be_killed_instead(
    manager: SandboxManager, team: Team, store: Store
) -> None:
    record = await manager.create(team, CreateOptions(idle_timeout_seconds=1, on_idle="kill"))
    await until(lambda: _state(store, record.id)[0] == "killed", "the idle kill")
    assert _state(store, record.id) == ("killed", "killed: idle for 1s")


# -- metrics ------------------------------------------------------------------------------


async def test_metrics_rings_then_the_store(
    manager: SandboxManager, team: Team, store: Store
) -> None:
    record = await manager.create(team, CreateOptions())
    box = await manager.running(team, record.id)
    await box.exec(["python3", "-c", "x = bytearray(32 << 20)\nwhile True: pass"], background=True)
    points: list[MetricPoint] = []

    async def sampled() -> bool:
        points[:] = await manager.metrics(team, record.id, "10m")
        return len(points) >= 8

    await until(sampled, "eight metric points")
    assert all(p.cpu_percent >= 0 and p.memory_bytes > 0 and p.pids >= 1 for p in points)
    assert max(p.cpu_percent for p in points) > 20  # the busy loop shows
    assert max(p.memory_bytes for p in points) > 32 << 20
    assert all(a.at < b.at for a, b in itertools.pairwise(points))
    assert len(await manager.metrics(team, record.id, "2h")) >= 1  # aggregated, in progress
    with pytest.raises(InvalidRequest, match="metrics range"):
        await manager.metrics(team, record.id, "1y")  # type: ignore[arg-type]
    await manager.kill(team, record.id)
    stored = await manager.metrics(team, record.id, "10m")
    assert len(stored) >= len(points) and stored[: len(points)] == points
    assert len(await manager.metrics(team, record.id, "2h")) >= 1
    assert store.metric_points(record.id, "24h", limit=10)  # the unfinished run, flushed


# -- warm pool ----------------------------------------------------------------------------


async def test_warm_pool_hands_out_ready_sandboxes_and_refills(
    managers: StartManager, store: Store
) -> None:
    team = store.create_team("pooled", max_sandboxes=1)
    manager = await managers(pool_size=2)
    await until(lambda: manager.pool.ready == 2, "a full pool")
    pooled_ids = {s.id for s in manager.pool._ready}
    # Pool sandboxes are nobody's: not listed, not counted against the team's quota of 1.
    assert await manager.list(team) == ([], "")
    options = CreateOptions(limits=Limits(memory_mib=200, pids=64), envs={"X": "1"})
    record = await manager.create(team, options)
    assert record.id in pooled_ids and record.state_reason == "created from the warm pool"
    assert record.limits == options.limits and manager.envs(record.id) == {"X": "1"}
    memory = Path(f"/sys/fs/cgroup/memory/{TEST_CGROUP_PARENT}/{record.id}")
    if memory.exists():  # cgroup v1: the claimed sandbox got the requested limit
        assert int((memory / "memory.limit_in_bytes").read_text()) == 200 << 20
    box = await manager.running(team, record.id)
    assert (await box.run(["sh", "-c", "echo ${X:-unset}"], env=manager.envs(record.id))).ok
    await until(lambda: manager.pool.ready == 2, "the pool refilled in the background")
    await manager.kill(team, record.id)
    cold = await manager.create(team, CreateOptions(limits=Limits(disk_mib=64)))
    assert cold.id not in pooled_ids and cold.state_reason == "created"


async def test_set_limits_changes_only_what_a_live_sandbox_can_change(
    manager: SandboxManager, team: Team
) -> None:
    record = await manager.create(team, CreateOptions())
    box = await manager.running(team, record.id)
    with pytest.raises(InvalidLimits, match="disk_mib cannot change"):
        box.set_limits(Limits(disk_mib=64))
    box.set_limits(Limits(memory_mib=128, output_bytes=5))
    assert box.spec.limits.memory_mib == 128
    result = await box.run(["yes"], timeout=10)  # endless output, cut at 5 bytes
    assert result.reason == "output_limit" and len(result.stdout) <= 5


# -- shutdown and crash safety -------------------------------------------------------------


async def test_aclose_kills_every_live_sandbox(
    msettings: Settings, store: Store, team: Team
) -> None:
    manager = SandboxManager(msettings, store, pool_size=1, tick=0.1)
    await manager.start()
    running = await manager.create(team, CreateOptions())
    paused = await manager.create(team, CreateOptions())
    await manager.pause(team, paused.id)
    await manager.aclose()
    for record in (running, paused):
        assert _state(store, record.id) == ("killed", "killed: server shut down")
        assert not (msettings.runtime_dir / "sandboxes" / record.id).exists()
    assert manager.engine.sandboxes == {}


def _orphan_row(store: Store, team: Team, sandbox_id: str, pid: int) -> None:
    store.insert_sandbox(
        new_sandbox_row(
            team,
            id=sandbox_id,
            limits={},
            owner_host=socket.gethostname(),
            owner_pid=pid,
            owner_start=process_start_time(pid) or 0,
        )
    )


async def test_restart_after_sigkill_fails_orphans_and_leaves_nothing(
    msettings: Settings, store: Store, team: Team
) -> None:
    child = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from corral.config import Settings
        from corral.sandboxes import CreateOptions, SandboxManager
        from corral.store import Store
        async def main():
            settings = Settings(data_dir=Path({str(msettings.data_dir)!r}),
                                runtime_dir=Path({str(msettings.runtime_dir)!r}),
                                cgroup_parent={msettings.cgroup_parent!r})
            store = Store.open(settings)
            team = store.team("acme")
            manager = SandboxManager(settings, store, pool_size=0)
            await manager.start()
            running = await manager.create(team, CreateOptions())
            paused = await manager.create(team, CreateOptions())
            box = await manager.running(team, running.id)
            await box.exec(["sleep", "300"], background=True)
            await manager.pause(team, paused.id)
            slots = [manager.engine.sandboxes[r.id].footprint.uid_slot for r in (running, paused)]
            print(running.id, paused.id, *slots, flush=True)
            await asyncio.sleep(300)
        asyncio.run(main())
    """)
    proc = processes.spawn([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    alive = processes.spawn(["sleep", "60"])
    try:
        assert proc.stdout is not None
        running_id, paused_id, *slots = proc.stdout.readline().split()
        proc.send_signal(signal.SIGKILL)  # no cleanup code runs in the server process
        proc.wait()
        proc.stdout.close()
        _orphan_row(store, team, "sb_" + "0" * 20, alive.pid)  # its server is still alive
        assert _state(store, running_id)[0] == "running"
        manager = SandboxManager(msettings, store, pool_size=0)
        await manager.start()
        try:
            for sandbox_id in (running_id, paused_id):
                assert _state(store, sandbox_id) == ("failed", ORPHANED)
                assert _transitions(store, sandbox_id)[-1][1] == "failed"
                assert not (msettings.runtime_dir / "sandboxes" / sandbox_id).exists()
                assert not cgroup_dirs(sandbox_id)
                assert sandbox_id not in Path("/proc/self/mountinfo").read_text()
            for slot in slots:
                if slot != "None":
                    assert host_processes_of_uid(*slot_ids(msettings, slot)) == []
            assert _state(store, "sb_" + "0" * 20)[0] == "running"
            with pytest.raises(SandboxNotRunning, match="failed"):
                await manager.running(team, running_id)
        finally:
            await manager.aclose()
    finally:
        alive.kill()
        alive.wait()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
