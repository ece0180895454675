"""Memory snapshots: `Sandbox.checkpoint` writes a sandbox whole (memory, processes,
files) into a directory and destroys it; `Engine.create(restore=...)` brings it back,
its processes still going. A tier without them refuses before anything changes."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable
from functools import partial
from pathlib import Path

import pytest

from corral import Sandbox as SdkSandbox
from corral.config import Settings
from corral.errors import (
    CorralError,
    InvalidRequest,
    IsolationUnavailable,
    SandboxError,
    SandboxNotRunning,
)
from corral.isolation import Engine, Sandbox
from corral.isolation.footprint import Footprint
from corral.isolation.gvisor import GvisorBackend
from corral.isolation.sandbox import SandboxState
from corral.sandboxes import CreateOptions, disk_pause
from corral.store import Store
from tests.conftest import (
    LiveServer,
    StartManager,
    cgroup_dirs,
    opts,
    require_backend,
    start_server,
)
from tests.kit import rootless as rootless_kit
from tests.kit.polling import until, wait_until

pytestmark = pytest.mark.sandbox


async def test_a_tier_without_memory_snapshots_refuses_to_checkpoint_and_changes_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    assert sandbox.backend == "namespace"
    image = tmp_path / "image"
    with pytest.raises(IsolationUnavailable, match="namespace tier has no memory snapshots"):
        await sandbox.checkpoint(image)
    assert not image.exists()
    assert sandbox.state is SandboxState.RUNNING
    assert (await sandbox.run(["echo", "still here"])).stdout == b"still here\n"


async def test_a_tier_without_memory_snapshots_refuses_to_restore_before_creating(
    engine: Engine, tmp_path: Path
) -> None:
    # The runtime dir is the session's: other tests' sandboxes and tiers' shared state
    # may be there; this refusal adds nothing to it.
    records = engine.settings.runtime_dir / "sandboxes"
    before = set(records.glob("*"))
    with pytest.raises(IsolationUnavailable, match="cannot restore a sandbox from a checkpoint"):
        await engine.create(isolation="namespace", restore=tmp_path)
    assert not engine.sandboxes
    assert set(records.glob("*")) == before


async def test_restoring_from_what_is_not_a_directory_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequest, match="is not a directory"):
        await engine.create(isolation="namespace", restore=tmp_path / "missing")


# -- gvisor ------------------------------------------------------------------------------


@pytest.fixture
async def gvisor(engine: Engine, settings: Settings) -> AsyncIterator[Sandbox]:
    """A `gvisor` sandbox (network none); skips, saying why, where runsc does not work."""
    require_backend(settings, "gvisor")
    box = await engine.create(isolation="gvisor")
    try:
        yield box
    finally:
        await box.destroy()


COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"


async def _count(box: Sandbox) -> int:
    done = await box.run(["cat", "/tmp/count"])
    return int(done.stdout)


def _runsc_processes(sandbox_id: str) -> list[int]:
    """Host processes whose command line names the sandbox (runsc's sandbox, gofer)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and sandbox_id.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


async def test_a_checkpoint_keeps_processes_and_files_and_frees_the_host(
    engine: Engine, gvisor: Sandbox, tmp_path: Path
) -> None:
    box = gvisor
    await box.run(["sh", "-c", "echo w > /workspace/w && echo h > /home/user/h && echo t > /tmp/t"])
    counter = await box.exec(["sh", "-c", COUNTER], background=True, tag="counter")
    await until(lambda: _count_or_none(box), "the counter to count")
    foreground = await box.exec(["sleep", "600"])
    committed = engine.committed_memory_mib()

    image = tmp_path / "image"
    await box.checkpoint(image)
    assert box.state is SandboxState.DESTROYED
    assert list(image.iterdir())  # runsc's state
    assert cgroup_dirs(box.id) == []  # nothing runs, no memory charged
    assert _runsc_processes(box.id) == []
    assert engine.committed_memory_mib() == committed - box.spec.limits.memory_mib
    assert (await foreground.wait()).reason == "killed"  # no command stream survives
    with pytest.raises(SandboxNotRunning):
        await box.run(["true"])

    restored = await engine.create(isolation="gvisor", sandbox_id=box.id, restore=image)
    try:
        shutil.rmtree(image)  # the caller's to remove once it runs
        listed = await restored.processes()
        assert [p.pid for p in listed if p.tag == "counter"] == [counter.pid]
        assert ["sleep", "600"] not in [p.argv for p in listed]  # the foreground command died
        before = await _count(restored)
        await until(
            lambda: _count_above(restored, before), "the counter to go on after the restore"
        )
        done = await restored.run(["cat", "/workspace/w", "/home/user/h", "/tmp/t"])
        assert done.stdout == b"w\nh\nt\n"
        assert (await restored.run(["sh", "-c", "echo again > /tmp/t; cat /tmp/t"])).stdout == (
            b"again\n"
        )
    finally:
        await restored.destroy()


async def test_a_paused_sandbox_can_be_checkpointed(
    engine: Engine, gvisor: Sandbox, tmp_path: Path
) -> None:
    await gvisor.exec(["sh", "-c", COUNTER], background=True)
    await until(lambda: _count_or_none(gvisor), "the counter to count")
    await gvisor.pause()
    await gvisor.checkpoint(tmp_path / "image")
    restored = await engine.create(
        isolation="gvisor", sandbox_id=gvisor.id, restore=tmp_path / "image"
    )
    try:
        before = await _count(restored)
        await until(lambda: _count_above(restored, before), "the counter to go on")
    finally:
        await restored.destroy()


async def test_checkpointing_into_a_directory_that_exists_is_refused_and_changes_nothing(
    gvisor: Sandbox, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequest, match="give a new directory"):
        await gvisor.checkpoint(tmp_path)
    with pytest.raises(InvalidRequest, match="give a new directory"):
        await gvisor.checkpoint(tmp_path / "missing" / "image")
    assert gvisor.state is SandboxState.RUNNING
    assert (await gvisor.run(["echo", "ok"])).stdout == b"ok\n"


async def test_a_gvisor_sandbox_with_a_network_cannot_be_restored(
    engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    require_backend(settings, "gvisor")
    with pytest.raises(IsolationUnavailable, match="runsc cannot checkpoint"):
        await engine.create(isolation="gvisor", network="internet", restore=tmp_path)
    assert not engine.sandboxes
    # A live sandbox's `checkpoint` asks the same `check_checkpoint` first thing; making
    # one with an uplink needs the fake internet (tests/kit/netdriver.py), not used here.


async def _above(value: Awaitable[int], floor: int) -> bool:
    return await value > floor


async def _count_or_none(box: Sandbox) -> int | None:
    done = await box.run(["cat", "/tmp/count"])
    return int(done.stdout) if done.exit_code == 0 and done.stdout.strip() else None


async def _count_above(box: Sandbox, floor: int) -> bool:
    return (await _count_or_none(box) or 0) > floor


class _CheckpointFails(GvisorBackend):
    """The gvisor tier, but its checkpoint fails after the agent has let go of its calls
    (as runsc's would on a full disk): a stand-in tier, the code under test unchanged."""

    def checkpoint(self, footprint: Footprint, image: Path) -> None:
        (image / "partial").write_bytes(b"half an image")
        raise SandboxError("runsc could not checkpoint (the test's failing tier)")


def _failing_gvisor(engine: Engine) -> None:
    # The engine's one instance per tier, replaced before any sandbox uses it.
    engine._backends["gvisor"] = _CheckpointFails(engine.settings)


async def test_a_checkpoint_that_fails_midway_destroys_the_sandbox_and_keeps_nothing(
    engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    require_backend(settings, "gvisor")
    _failing_gvisor(engine)
    box = await engine.create(isolation="gvisor")
    committed = engine.committed_memory_mib()
    with pytest.raises(SandboxError, match="could not checkpoint"):
        await box.checkpoint(tmp_path / "image")
    assert box.state is SandboxState.DESTROYED  # no connection left to go on with
    assert not (tmp_path / "image").exists()
    assert cgroup_dirs(box.id) == []
    assert engine.committed_memory_mib() == committed - box.spec.limits.memory_mib


async def test_a_pause_to_disk_that_fails_midway_marks_the_sandbox_failed(
    engine: Engine, msettings: Settings, managers: StartManager, store: Store
) -> None:
    require_backend(msettings, "gvisor")
    _failing_gvisor(engine)
    manager = await managers(engine=engine)
    team = store.create_team("acme")
    record = await manager.create(team, CreateOptions(template="host", isolation="gvisor"))
    with pytest.raises(SandboxError, match="could not checkpoint"):
        await manager.pause(team, record.id, keep_memory=False)
    row = store.sandbox(record.id)
    assert row is not None and row.state == "failed"
    assert "could not pause it to disk" in row.state_reason
    assert not list(disk_pause.directory(msettings.data_dir).glob(f"{record.id}*"))


async def test_an_idle_gvisor_sandbox_paused_to_disk_by_its_timer_keeps_its_processes(
    engine: Engine, msettings: Settings, managers: StartManager, store: Store
) -> None:
    """E2B's autoPause with autoPauseMemory=false: the timer's pause to disk keeps the
    memory where the tier can, and resume finds the processes going."""
    require_backend(msettings, "gvisor")
    manager = await managers(engine=engine)
    team = store.create_team("acme")
    options = CreateOptions(
        template="host",
        isolation="gvisor",
        idle_timeout_seconds=2,
        on_idle="pause",
        pause_keeps_memory=False,
    )
    record = await manager.create(team, options)
    sandbox = await manager.running(team, record.id)
    counter = await sandbox.exec(["sh", "-c", COUNTER], background=True, tag="counter")
    await counter.detach()

    def paused() -> str | None:
        row = store.sandbox(record.id)
        return row.state_reason if row is not None and row.state == "paused" else None

    reason = await until(paused, "the idle timer to pause it to disk")
    assert reason == "paused to disk: idle for 2s"
    assert cgroup_dirs(record.id) == []
    resumed = await manager.resume(team, record.id)
    assert "restored with its memory" in resumed.state_reason

    async def count() -> int:  # through the manager: activity, so no idle pause meanwhile
        return await _count(await manager.running(team, record.id))

    before = await count()
    restored = await manager.running(team, record.id)
    assert [p.pid for p in await restored.processes() if p.tag == "counter"] == [counter.pid]
    await until(lambda: _above(count(), before), "the counter to go on")


_ROOTLESS = """
import asyncio
from pathlib import Path
from corral.config import Settings
from corral.errors import IsolationUnavailable
from corral.isolation import Engine
from corral.isolation.registry import backend_class

async def main():
    settings = Settings(**{k: (Path(v) if k.endswith("_dir") else v) for k, v in %r.items()})
    caps = backend_class("gvisor").probe(settings)
    if not caps.available:
        print("unavailable", "; ".join(caps.missing))
        return
    async with Engine(settings) as engine:
        async with await engine.create(isolation="gvisor") as box:
            try:
                await box.checkpoint(settings.data_dir / "image")
            except IsolationUnavailable as exc:
                print("refused", exc)
            print((await box.run(["echo", "still running"])).stdout.decode().strip())
            print((settings.data_dir / "image").exists())
    print(sorted(p.name for p in (settings.runtime_dir / "sandboxes").iterdir()))

asyncio.run(main())
"""


def test_without_root_a_gvisor_sandbox_is_not_checkpointed_and_runs_on(
    settings: Settings,
) -> None:
    """runsc refuses `--rootless restore`: the checkpoint is refused before anything
    changes, rather than written and never restorable."""
    require_backend(settings, "gvisor")
    if missing := rootless_kit.missing():
        pytest.skip(f"running an engine without root needs {', '.join(missing)}")
    with (
        rootless_kit.home() as home,
        rootless_kit.delegated_cgroup(settings.cgroup_parent) as cgroup_parent,
    ):
        fields = {
            "runtime_dir": str(home / "run"),
            "data_dir": str(home / "data"),
            "cgroup_parent": cgroup_parent,
        }
        done = subprocess.run(
            ["setpriv", f"--reuid={rootless_kit.NOBODY}", f"--regid={rootless_kit.NOBODY}",
             "--clear-groups", "--", sys.executable, "-c", _ROOTLESS % (fields,)],
            capture_output=True, text=True, timeout=120, cwd="/",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused the gvisor tier cannot checkpoint a sandbox without root")
    assert lines[1:] == ["still running", "False", "[]"], lines


# -- pause to disk through a real server -------------------------------------------------


def _requires_gvisor(settings: Settings) -> None:
    require_backend(settings, "gvisor")


def _sdk_count(sbx: SdkSandbox) -> int | None:
    done = sbx.commands.run(["cat", "/tmp/count"])
    return int(done.stdout) if done.exit_code == 0 and done.stdout.strip() else None


def _start_counter(sbx: SdkSandbox) -> int:
    """A background counter in the sandbox (tag "counter"); its pid once it counts."""
    sbx.commands.run(["sh", "-c", COUNTER], background=True, tag="counter")
    wait_until(lambda: _sdk_count(sbx), "the counter to count")
    return _counter_pid(sbx)


def _counter_pid(sbx: SdkSandbox) -> int:
    [pid] = [p.pid for p in sbx.commands.list() if p.tag == "counter"]
    return pid


def _counts_on(sbx: SdkSandbox) -> None:
    before = _sdk_count(sbx) or 0
    wait_until(lambda: (_sdk_count(sbx) or 0) > before, "the counter to go on")


def test_pause_to_disk_on_gvisor_keeps_memory_and_processes(
    settings: Settings, server: LiveServer
) -> None:
    _requires_gvisor(settings)
    with SdkSandbox.create("host", isolation="gvisor", timeout=120, **opts(server)) as sbx:
        sbx.files.write("/workspace/note", "kept")
        pid = _start_counter(sbx)

        done = server.corral("sandbox", "pause", "--to-disk", sbx.sandbox_id)
        assert done.returncode == 0 and "paused" in done.stdout, done.stderr
        info = sbx.get_info()
        assert info.state == "paused" and info.state_reason == "paused to disk: by request"
        assert cgroup_dirs(sbx.sandbox_id) == []  # nothing runs, no memory charged
        assert _runsc_processes(sbx.sandbox_id) == []
        checkpoint = server.data_dir / "paused" / f"{sbx.sandbox_id}.checkpoint"
        assert list(checkpoint.iterdir())
        with pytest.raises(CorralError, match="paused"):
            sbx.files.read("/workspace/note")
        # An uplink it could not have running is refused paused too, changing nothing.
        with pytest.raises(CorralError, match="no uplink"):
            sbx.update_network("internet")
        assert sbx.get_info().network.mode == "none"

        info = sbx.resume()
        assert info.state == "running"
        assert "restored with its memory: its processes go on" in info.state_reason
        assert not checkpoint.exists()  # the live sandbox holds what it needs
        assert _counter_pid(sbx) == pid
        _counts_on(sbx)
        assert sbx.files.read("/workspace/note") == "kept"
        # It pauses to disk again, as often as asked.
        sbx.pause(keep_memory=False)
        sbx.resume()
        assert _counter_pid(sbx) == pid
    assert not (server.data_dir / "paused" / f"{sbx.sandbox_id}.checkpoint").exists()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
def test_a_gvisor_sandbox_paused_to_disk_survives_a_server_restart_with_its_processes(
    settings: Settings, stop: signal.Signals
) -> None:
    _requires_gvisor(settings)
    data = settings.runtime_dir / f"memory-pause-restart-{stop.name}"
    first = start_server(settings, data, pool_size=0)
    try:
        sbx = SdkSandbox.create("host", isolation="gvisor", timeout=120, **opts(first))
        pid = _start_counter(sbx)
        sbx.files.write("/tmp/note", "kept")
        sbx.pause(keep_memory=False)
    finally:
        first.stop(stop)
    second = start_server(settings, data, pool_size=0)
    try:
        again = SdkSandbox.connect(sbx.sandbox_id, resume=False, **opts(second))
        assert again.info.state == "paused"
        again = SdkSandbox.connect(sbx.sandbox_id, **opts(second))  # resumes it
        assert again.info.state == "running"
        assert _counter_pid(again) == pid
        _counts_on(again)
        assert again.files.read("/tmp/note") == "kept"
        again.kill()
        assert not list((data / "paused").iterdir())  # its checkpoint is gone with it
    finally:
        second.stop()


WARM = (
    "import os, time\n"
    "token = os.urandom(8).hex()\n"  # made once, before the checkpoint: in its memory
    "i = 0\n"
    "while True:\n"
    "    i += 1\n"
    "    open('/tmp/warm.tmp', 'w').write(f'{token} {i}')\n"
    "    os.rename('/tmp/warm.tmp', '/tmp/warm')\n"
    "    time.sleep(0.1)\n"
)


async def _warm_state(box: Sandbox) -> tuple[str, int] | None:
    done = await box.run(["cat", "/tmp/warm"])
    if done.exit_code != 0 or not done.stdout:
        return None
    token, count = done.stdout.decode().split()
    return token, int(count)


async def test_one_checkpoint_restores_into_many_new_sandboxes(
    engine: Engine, gvisor: Sandbox, tmp_path: Path
) -> None:
    """What a memory template is made of: a process started once, its memory restored
    into each new sandbox, each going on alone from there."""
    warm = await gvisor.exec(["python3", "-c", WARM], background=True, tag="warm")
    token, _ = await until(lambda: _warm_state(gvisor), "the warm process to start")
    image = tmp_path / "image"
    await gvisor.checkpoint(image)

    first = await engine.create(isolation="gvisor", restore=image)
    second = await engine.create(isolation="gvisor", restore=image)
    try:
        assert len({gvisor.id, first.id, second.id}) == 3
        for box in (first, second):
            assert [p.pid for p in await box.processes() if p.tag == "warm"] == [warm.pid]
            state = await until(partial(_warm_state, box), "the warm process")
            assert state[0] == token  # the same memory
            await until(partial(_count_state_above, box, state[1]), "the warm process to go on")
        await first.run(["sh", "-c", "echo mine > /tmp/own"])
        assert (await second.run(["cat", "/tmp/own"])).exit_code != 0  # files apart
    finally:
        await first.destroy()
        await second.destroy()


async def _count_state_above(box: Sandbox, floor: int) -> bool:
    state = await _warm_state(box)
    return state is not None and state[1] > floor
