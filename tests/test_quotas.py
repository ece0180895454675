"""Issue 9, finding 2: a team's quotas bound its totals, the host admits only the memory
it has, and no writable path in a sandbox escapes its disk limit.

Real sandboxes, a real server on a free port and real SQLite stores: no mocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
import sys
import textwrap
import threading
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest

from corral.client import AsyncSandbox
from corral.client import Limits as ClientLimits
from corral.config import Settings
from corral.errors import CapacityExceeded, InvalidRequest, QuotaExceeded
from corral.isolation import Engine, Entrypoint, Limits
from corral.jobs.queue import JobQueue
from corral.jobs.spec import JobSpec
from corral.limits import host_memory_mib
from corral.sandboxes import CreateOptions
from corral.sandboxes.pool import WarmPool
from corral.store import SandboxRow, Store, Team
from tests.conftest import (
    LiveServer,
    StartManager,
    new_sandbox_row,
    overcommit_for,
    require_backend,
    start_server,
    tiny_host,
)
from tests.kit.polling import until

pytestmark = pytest.mark.sandbox

MIB = 1 << 20


# -- team totals ---------------------------------------------------------------------------


async def test_a_team_at_its_memory_total_is_refused_and_one_below_is_not(
    server: LiveServer,
) -> None:
    """Today's main checks memory per sandbox only: 20 x 4 GiB pass a 8 GiB quota."""
    name = f"tight-{secrets.token_hex(3)}"
    done = server.corral("admin", "team", "create", name, "--max-memory-mib", "1024")
    assert done.returncode == 0, done.stderr
    done = server.corral("admin", "key", "create", "--team", name)
    key = done.stdout.strip().splitlines()[-1]
    half = ClientLimits(memory_mib=512)
    first = await AsyncSandbox.create(server=server.url, api_key=key, limits=half)
    second = await AsyncSandbox.create(server=server.url, api_key=key, limits=half)
    try:  # 1024 of 1024 MiB: at the total, and nothing more fits, not even 16 MiB
        with pytest.raises(QuotaExceeded) as refused:
            await AsyncSandbox.create(
                server=server.url, api_key=key, limits=ClientLimits(memory_mib=16)
            )
        message = str(refused.value)
        assert "memory_mib=16" in message and "hold 1024 of 1024 MiB" in message
        assert "max_memory_mib" in message and "ask an admin for a larger quota" in message
        listed = await AsyncSandbox.list(server=server.url, api_key=key)
        assert len(listed) == 2  # the refusal changed nothing
    finally:
        await first.kill()
        await first.aclose()
    try:  # one below the total: room again
        third = await AsyncSandbox.create(server=server.url, api_key=key, limits=half)
        await third.kill()
        await third.aclose()
    finally:
        await second.kill()
        await second.aclose()


def test_totals_count_memory_cpu_disk_and_sandboxes(store: Store) -> None:
    team = store.create_team(
        "acme", max_sandboxes=3, max_memory_mib=1000, max_cpu=2.5, max_disk_mib=3000
    )
    store.insert_sandbox(_row(team, memory_mib=600, cpu=1.0, disk_mib=1000))
    cases: list[tuple[dict[str, float], str]] = [
        (dict(memory_mib=401), r"memory_mib=401 .*\(max_memory_mib\).* hold 600 of 1000 MiB"),
        (dict(cpu=1.6), r"cpu=1.6 .*\(max_cpu\).* hold 1 of 2.5 cores"),
        (dict(disk_mib=2001), r"disk_mib=2001 .*\(max_disk_mib\).* hold 1000 of 3000 MiB"),
    ]
    for asked, refusal in cases:
        with pytest.raises(QuotaExceeded, match=refusal):
            store.insert_sandbox(_row(team, **{"memory_mib": 100, **asked}))
    store.insert_sandbox(_row(team, memory_mib=400, cpu=1.5, disk_mib=2000))  # exactly full
    with pytest.raises(QuotaExceeded, match=r"hold 1000 of 1000 MiB"):
        store.insert_sandbox(_row(team))
    small = store.create_team("small", max_sandboxes=1)
    store.insert_sandbox(_row(small))
    with pytest.raises(QuotaExceeded, match=r"has 1 live .* allows 1 \(max_sandboxes\)"):
        store.insert_sandbox(_row(small))
    # Only live sandboxes count, and each team counts alone.
    assert len(store.live_sandboxes()) == 3


@pytest.mark.usefixtures("database")  # on SQLite and PostgreSQL (its row locks)
def test_concurrent_creates_cannot_pass_the_quota(msettings: Settings, store: Store) -> None:
    """Eight processes' worth of stores insert at once; the quota lets exactly three in."""
    team = store.create_team("racy", max_memory_mib=3 * 512)
    stores = [Store.open(msettings) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def create(each: Store) -> None:
        barrier.wait()
        try:
            each.insert_sandbox(_row(team, memory_mib=512))
            outcomes.append("created")
        except QuotaExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(each,)) for each in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for each in stores:
        each.close()
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    live = [row for row in store.live_sandboxes() if row.team_id == team.id]
    assert sum(row.limits["memory_mib"] for row in live) == 3 * 512


async def test_paused_sandboxes_count_and_killed_ones_do_not(
    managers: StartManager, store: Store
) -> None:
    """A paused sandbox is frozen, not swapped out: it keeps its memory, so it counts."""
    manager = await managers()
    team = store.create_team("pausing", max_memory_mib=1024)
    first = await manager.create(team, CreateOptions())
    await manager.pause(team, first.id)
    second = await manager.create(team, CreateOptions())
    with pytest.raises(QuotaExceeded, match=r"paused ones included\) hold 1024 of 1024 MiB"):
        await manager.create(team, CreateOptions())
    await manager.kill(team, first.id)
    await manager.create(team, CreateOptions())
    await manager.kill(team, second.id)


async def test_a_job_must_fit_the_teams_totals_at_submit(msettings: Settings, store: Store) -> None:
    team = store.create_team("jobs", max_memory_mib=1024, max_cpu=2, max_disk_mib=2048)
    queue = JobQueue(store, msettings)
    for limits, refusal in [
        ({"memory_mib": 1025}, r"memory_mib=1025 is more than .* 1024 MiB .*\(max_memory_mib\)"),
        ({"cpu": 2.5}, r"cpu=2.5 is more than .* 2 cores .*\(max_cpu\)"),
        ({"disk_mib": 4096}, r"disk_mib=4096 is more than .* 2048 MiB .*\(max_disk_mib\)"),
    ]:
        with pytest.raises(QuotaExceeded, match=refusal):
            await queue.submit(team, JobSpec.from_dict({"command": ["true"], "limits": limits}))
    assert store.list_jobs(team.id)[0] == []
    await queue.submit(
        team, JobSpec.from_dict({"command": ["true"], "limits": {"memory_mib": 1024, "cpu": 2}})
    )


# -- host admission --------------------------------------------------------------------------


async def test_the_host_refuses_memory_past_its_capacity(msettings: Settings) -> None:
    settings = tiny_host(msettings, 700)
    async with Engine(settings) as engine:
        capacity = engine.memory_capacity.mib
        assert 690 <= capacity <= 700
        quarter = Limits(memory_mib=256)
        boxes = [await engine.create(isolation="namespace", limits=quarter) for _ in range(2)]
        assert engine.committed_memory_mib() == 512
        with pytest.raises(CapacityExceeded) as refused:
            await engine.create(isolation="namespace", limits=quarter)
        message = str(refused.value)
        assert "memory_mib=256" in message and "hold 512 MiB" in message
        assert f"capacity of {capacity} MiB" in message and "CORRAL_MEMORY_OVERCOMMIT" in message
        # Every path: a one-shot sandbox, and raising a live sandbox's memory.
        with pytest.raises(CapacityExceeded):
            await engine.create(
                isolation="namespace", limits=quarter, entrypoint=Entrypoint(["true"])
            )
        with pytest.raises(CapacityExceeded):
            await engine.set_limits(boxes[0], Limits(memory_mib=512))
        assert boxes[0].spec.limits.memory_mib == 256  # unchanged
        await engine.set_limits(boxes[0], Limits(memory_mib=400))  # 400 + 256 fits
        assert len(engine.sandboxes) == 2  # nothing was left of the refused ones
        await boxes[1].destroy()
        third = await engine.create(isolation="namespace", limits=quarter)
        assert (await third.run(["true"])).ok


def test_capacity_settings_are_checked(msettings: Settings) -> None:
    for bad in (0.0, -1.0):
        with pytest.raises(InvalidRequest, match="CORRAL_MEMORY_OVERCOMMIT"):
            Engine(msettings.with_(memory_overcommit=bad))
    with pytest.raises(InvalidRequest, match="CORRAL_MEMORY_RESERVE_MIB"):
        Engine(msettings.with_(memory_reserve_mib=host_memory_mib()))
    with pytest.raises(InvalidRequest, match="CORRAL_MEMORY_OVERCOMMIT='x' is not a number"):
        Settings.from_env({"CORRAL_MEMORY_OVERCOMMIT": "x"})
    assert Settings.from_env({"CORRAL_MEMORY_OVERCOMMIT": "1.5"}).memory_overcommit == 1.5


async def test_a_full_host_does_not_refill_the_pool_nor_starve_real_sandboxes(
    msettings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Pooled sandboxes hold memory but are spares: a real sandbox that does not fit
    destroys them; a refill that does not fit waits, quietly, for room."""
    caplog.set_level(logging.INFO, "corral")
    async with Engine(tiny_host(msettings, 1100)) as engine:
        pool = WarmPool(engine, 3, "host", "namespace")
        pool.start()
        try:
            await until(lambda: pool.ready == 2, "two in the pool")  # 2 x 512 MiB; no third fits
            await asyncio.sleep(1.5)
            assert pool.ready == 2
            real = await engine.create(isolation="namespace", limits=Limits(memory_mib=1024))
            assert pool.ready == 0 and engine.committed_memory_mib() == 1024
            await asyncio.sleep(1.5)
            assert pool.ready == 0  # no room: no refill
            await real.destroy()
            await until(lambda: pool.ready == 2, "the pool refilled")  # room again
        finally:
            await pool.aclose()
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]
    waits = [r for r in caplog.records if "warm pool waits for room" in r.getMessage()]
    assert 1 <= len(waits) <= 2  # said once per time it filled up, not at every retry


async def test_a_claimed_pool_sandbox_makes_room_by_destroying_spares(
    managers: StartManager, msettings: Settings, store: Store
) -> None:
    manager = await managers(tiny_host(msettings, 1100), pool_size=2)
    await until(lambda: manager.pool.ready == 2, "a full pool")
    team = store.create_team("big", max_memory_mib=4096)
    record = await manager.create(team, CreateOptions(limits=Limits(memory_mib=1024)))
    assert record.state_reason == "created from the warm pool"
    assert manager.engine.committed_memory_mib() == 1024
    with pytest.raises(CapacityExceeded):
        await manager.create(team, CreateOptions(limits=Limits(memory_mib=128)))
    assert [r.id for r in (await manager.list(team))[0]] == [record.id]


def test_the_server_answers_resource_exhausted_with_the_figures(
    own_runtime: Settings, tmp_path: Path
) -> None:
    settings = own_runtime
    require_backend(settings, "namespace")
    live = start_server(
        settings,
        tmp_path / "data",
        pool_size=0,
        extra_env={"CORRAL_MEMORY_OVERCOMMIT": repr(overcommit_for(settings, 300))},
    )
    try:
        response = httpx.post(
            f"{live.url}/corral.v1.SandboxService/Create",
            content=json.dumps({"limits": {"memoryMib": 512}}),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {live.key}"},
            timeout=30,
        )
        body = response.json()
        assert body["code"] == "resource_exhausted", body
        assert "memory_mib=512" in body["message"] and "hold 0 MiB" in body["message"]
        assert "CORRAL_MEMORY_OVERCOMMIT" in body["message"]
    finally:
        live.stop()


# -- writable paths within the disk limit ---------------------------------------------------

# Run inside the sandbox: every directory on a writable mount that the sandbox user can
# create files in gets up to 200 MiB, kept; prints what each took and how it ended.
_FILL = textwrap.dedent(
    """
    import errno, json, os
    mounts = {}
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        sep = fields.index("-")
        mounts[fields[4]] = (fields[sep + 1], fields[5].split(","))
    chunk = b"x" * (1 << 20)
    report = {}
    for point, (fstype, options) in sorted(mounts.items()):
        if fstype in ("proc", "sysfs") or "ro" in options or not os.path.isdir(point):
            continue
        for top, dirs, _ in os.walk(point):
            dirs[:] = [d for d in dirs if os.path.join(top, d) not in mounts]
            try:
                fd = os.open(os.path.join(top, ".fill"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    report[top] = [0, "ENOSPC"]
                continue
            written, ended = 0, "wrote 200 MiB"
            try:
                while written < 200 << 20:
                    written += os.write(fd, chunk)
            except OSError as exc:
                ended = errno.errorcode[exc.errno]
            os.close(fd)
            report[top] = [written, ended]
    print(json.dumps(report))
    """
)


async def test_no_writable_path_escapes_the_disk_limit(engine: Engine, settings: Settings) -> None:
    """/dev was bubblewrap's own unbounded tmpfs: 200 MiB went there under a 64 MiB limit."""
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace", limits=Limits(disk_mib=64, memory_mib=512))
    try:
        result = await box.run(["python3", "-c", _FILL], timeout=60)
        assert result.ok, result.stderr
        report = json.loads(result.stdout)
    finally:
        await box.destroy()
    assert {"/workspace", "/tmp", "/home/user", "/dev/shm"} <= set(report), report
    assert all(ended == "ENOSPC" for _, ended in report.values()), report
    assert sum(written for written, _ in report.values()) <= 64 * MIB, report


def _row(team: Team, **limits: float) -> SandboxRow:
    return new_sandbox_row(team, limits={**asdict(Limits()), **limits})


def test_doctor_prints_the_memory_capacity(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "doctor"],
        capture_output=True,
        text=True,
        env={**os.environ, "CORRAL_MEMORY_OVERCOMMIT": "0.5", "COLUMNS": "300"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "sandbox memory capacity per process" in done.stdout
    assert "x overcommit 0.5" in done.stdout and "CORRAL_MEMORY_OVERCOMMIT" in done.stdout
