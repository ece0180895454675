"""Memory snapshots of microvm sandboxes (QEMU migration to a file): a checkpoint keeps
the guest's processes, memory and disk and frees the host; a restore goes on from there,
its clock set; pause to disk through a server keeps them across a server restart.
Each test boots its own VM (a checkpoint ends it): under TCG the variations are `slow`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import Limits as SdkLimits
from corral import Sandbox as SdkSandbox
from corral.config import Settings
from corral.errors import InvalidRequest, SandboxNotRunning
from corral.images import Layer, LayerStore
from corral.isolation import Engine, Sandbox
from corral.isolation.microvm import MicrovmBackend
from corral.isolation.sandbox import SandboxState
from corral.limits import Limits
from tests.conftest import cgroup_dirs, opts, start_server
from tests.kit.debian import needs_archive
from tests.kit.polling import until, wait_until
from tests.test_template_server import add_template

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
# How long the first test keeps its sandbox on disk: the guest's clock must catch up.
ON_DISK = 10.0
# A small guest: TCG boots and migrates it in seconds.
LIMITS = Limits(memory_mib=256, cpu=1)


def _vm_settings(settings: Settings) -> Settings:
    """`settings` (with the guest kernel `make setup` fetched); skips, saying why, where
    the microvm tier is unavailable."""
    caps = MicrovmBackend.probe(settings)
    if not caps.available:
        pytest.skip(f"microvm backend unavailable here: {'; '.join(caps.missing)}")
    return settings


@pytest.fixture
async def engine_vm(
    settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> AsyncIterator[Engine]:
    """An engine with the Debian base as the template `debian`."""
    store, layer = debian_base
    engine = Engine(_vm_settings(settings))
    engine.templates.add("debian", store, [layer.digest])
    try:
        yield engine
    finally:
        await engine.aclose()


@pytest.fixture
async def microvm(engine_vm: Engine) -> AsyncIterator[Sandbox]:
    """A microvm sandbox of the Debian template (its own: a checkpoint destroys it)."""
    box = await engine_vm.create("debian", limits=LIMITS, isolation="microvm")
    try:
        yield box
    finally:
        await box.destroy()


async def _count_or_none(box: Sandbox) -> int | None:
    done = await box.run(["cat", "/tmp/count"])
    return int(done.stdout) if done.exit_code == 0 and done.stdout.strip() else None


async def _count_above(box: Sandbox, floor: int) -> bool:
    return (await _count_or_none(box) or 0) > floor


def _qemu_processes(sandbox_id: str) -> list[int]:
    """Host processes whose command line names the sandbox (its QEMU)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and sandbox_id.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


async def test_a_microvm_checkpoint_keeps_processes_memory_and_disk_and_frees_the_host(
    engine_vm: Engine, microvm: Sandbox, tmp_path: Path
) -> None:
    engine, box = engine_vm, microvm
    await box.run(["sh", "-c", "echo on-disk > /workspace/w && echo in-tmp > /tmp/t"])
    counter = await box.exec(["sh", "-c", COUNTER], background=True, tag="counter")
    await until(lambda: _count_or_none(box), "the counter to count")
    foreground = await box.exec(["sleep", "600"])
    committed = engine.committed_memory_mib()

    image = tmp_path / "image"
    await box.checkpoint(image)
    assert box.state is SandboxState.DESTROYED
    assert {p.name for p in image.iterdir()} >= {"memory", "disk.img"}
    assert cgroup_dirs(box.id) == []  # nothing runs, no memory charged
    assert _qemu_processes(box.id) == []
    assert engine.committed_memory_mib() == committed - LIMITS.memory_mib
    assert (await foreground.wait()).reason == "killed"  # no command stream survives
    with pytest.raises(SandboxNotRunning):
        await box.run(["true"])
    await asyncio.sleep(ON_DISK)  # time the guest's own clock does not see pass

    restored = await engine.create(
        "debian", limits=LIMITS, isolation="microvm", sandbox_id=box.id, restore=image
    )
    try:
        shutil.rmtree(image)  # the caller's to remove once it runs
        guest_now = float((await restored.run(["date", "+%s"])).stdout)
        assert abs(guest_now - time.time()) < ON_DISK / 2  # its clock was set on restore
        listed = await restored.processes()
        assert [p.pid for p in listed if p.tag == "counter"] == [counter.pid]
        assert ["sleep", "600"] not in [p.argv for p in listed]
        before = await _count_or_none(restored) or 0
        await until(lambda: _count_above(restored, before), "the counter to go on")
        done = await restored.run(["cat", "/workspace/w", "/tmp/t"])
        assert done.stdout == b"on-disk\nin-tmp\n"
        written = await restored.run(["sh", "-c", "echo again > /workspace/w; cat /workspace/w"])
        assert written.stdout == b"again\n"
    finally:
        await restored.destroy()
    assert _qemu_processes(box.id) == []


@pytest.mark.slow
async def test_one_microvm_checkpoint_restores_into_two_sandboxes_with_their_own_disks(
    engine_vm: Engine, microvm: Sandbox, tmp_path: Path
) -> None:
    counter = await microvm.exec(["sh", "-c", COUNTER], background=True, tag="counter")
    await until(lambda: _count_or_none(microvm), "the counter to count")
    image = tmp_path / "image"
    await microvm.checkpoint(image)
    for _ in range(2):  # one at a time: two TCG guests at once is a lot for a CI box
        box = await engine_vm.create("debian", limits=LIMITS, isolation="microvm", restore=image)
        try:
            assert [p.pid for p in await box.processes() if p.tag == "counter"] == [counter.pid]
            mine = await box.run(["sh", "-c", "cat /workspace/own; echo mine > /workspace/own"])
            assert mine.stdout == b""  # the first restore's write is not in the second's disk
        finally:
            await box.destroy()


@pytest.mark.slow
async def test_restoring_a_microvm_with_other_limits_is_refused_and_leaves_nothing(
    engine_vm: Engine, microvm: Sandbox, tmp_path: Path, settings: Settings
) -> None:
    image = tmp_path / "image"
    await microvm.checkpoint(image)
    other = Limits(memory_mib=LIMITS.memory_mib * 2, cpu=1)
    with pytest.raises(InvalidRequest, match="restore it with the template and limits"):
        await engine_vm.create("debian", limits=other, isolation="microvm", restore=image)
    assert not engine_vm.sandboxes
    assert not list((settings.runtime_dir / "sandboxes").glob("*"))
    assert {p.name for p in image.iterdir()} >= {"memory", "disk.img"}  # still restorable


@pytest.mark.slow
async def test_a_microvm_with_a_ram_disk_keeps_its_files_in_the_checkpoint_memory(
    engine_vm: Engine, tmp_path: Path
) -> None:
    box = await engine_vm.create("debian", limits=LIMITS, isolation="microvm", ram_disk=True)
    await box.run(["sh", "-c", "echo in-ram > /workspace/w"])
    image = tmp_path / "image"
    await box.checkpoint(image)
    assert "disk.img" not in {p.name for p in image.iterdir()}  # its files are its memory
    with pytest.raises(InvalidRequest, match="ram_disk=True"):  # asked without: refused
        await engine_vm.create("debian", limits=LIMITS, isolation="microvm", restore=image)
    restored = await engine_vm.create(
        "debian", limits=LIMITS, isolation="microvm", ram_disk=True, restore=image
    )
    try:
        assert (await restored.run(["cat", "/workspace/w"])).stdout == b"in-ram\n"
    finally:
        await restored.destroy()


async def test_restoring_a_microvm_from_what_is_no_checkpoint_is_refused_and_leaves_nothing(
    engine_vm: Engine, tmp_path: Path, settings: Settings
) -> None:
    # The runtime dir is the session's: other tests' sandboxes and warm pools' spares may
    # be there; this refusal adds nothing to it.
    records = settings.runtime_dir / "sandboxes"
    before = set(records.glob("*"))
    with pytest.raises(InvalidRequest, match="is not a microvm checkpoint"):
        await engine_vm.create("debian", limits=LIMITS, isolation="microvm", restore=tmp_path)
    assert not engine_vm.sandboxes
    assert set(records.glob("*")) == before


# -- pause to disk through a real server -------------------------------------------------


def _sdk_count(sbx: SdkSandbox) -> int | None:
    done = sbx.commands.run(["cat", "/tmp/count"])
    return int(done.stdout) if done.exit_code == 0 and done.stdout.strip() else None


def _counter_pid(sbx: SdkSandbox) -> int:
    [pid] = [p.pid for p in sbx.commands.list() if p.tag == "counter"]
    return pid


@pytest.mark.parametrize(
    "stop",
    [  # a crash is the harder case; a clean stop adds a minute of TCG: `make test-slow`
        pytest.param(signal.SIGTERM, id="stopped", marks=pytest.mark.slow),
        pytest.param(signal.SIGKILL, id="crashed"),
    ],
)
def test_a_microvm_paused_to_disk_survives_a_server_restart_with_its_processes(
    own_runtime: Settings, stop: signal.Signals
) -> None:
    vm = _vm_settings(own_runtime)
    data = vm.data_dir
    start_server(vm, data, pool_size=0).stop()  # makes the default team
    add_template(vm, "base")
    first = start_server(vm, data, pool_size=0)
    try:
        sbx = SdkSandbox.create(
            "base",
            isolation="microvm",
            limits=SdkLimits(memory_mib=LIMITS.memory_mib, cpu=LIMITS.cpu),
            timeout=300,
            **opts(first),
        )
        sbx.commands.run(["sh", "-c", COUNTER], background=True, tag="counter")
        wait_until(lambda: _sdk_count(sbx), "the counter to count")
        pid = _counter_pid(sbx)
        sbx.files.write("/workspace/note", "kept")
        info = sbx.pause(keep_memory=False)
        assert info.state == "paused"
        assert cgroup_dirs(sbx.sandbox_id) == []
        assert _qemu_processes(sbx.sandbox_id) == []
    finally:
        first.stop(stop)
    second = start_server(vm, data, pool_size=0)
    try:
        again = SdkSandbox.connect(sbx.sandbox_id, **opts(second))  # resumes it
        assert again.info.state == "running"
        assert "restored with its memory" in again.info.state_reason
        assert _counter_pid(again) == pid
        before = _sdk_count(again) or 0
        wait_until(lambda: (_sdk_count(again) or 0) > before, "the counter to go on")
        assert again.files.read("/workspace/note") == "kept"
        again.kill()
        assert not list((data / "paused").iterdir())
    finally:
        second.stop()
