"""The `microvm` tier: a QEMU microvm per sandbox, its guest agent on virtio-serial.

Under TCG (this CI host: no usable KVM) a boot takes seconds, so the read-only checks
share one VM (module fixture); the tests that need a VM of their own are `slow`.
They skip, with the probe's reason, where QEMU or the guest kernel is missing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from corral.config import Settings
from corral.errors import IsolationUnavailable, SandboxStartFailed
from corral.images import Layer, LayerStore
from corral.isolation import Engine, Sandbox, guest_kernel
from corral.isolation.microvm import MicrovmBackend, kernel_dir, kvm_reason
from corral.limits import Limits
from tests.conftest import cgroup_dirs
from tests.kit.debian import needs_archive

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]
# Where `make setup` downloads the guest kernel (a worktree shares its checkout's).
KERNELS = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel"
LIMITS = Limits(cpu=2, memory_mib=384, disk_mib=256)


@pytest.fixture(scope="module")
def vm_settings(settings: Settings) -> Settings:
    vm = settings.with_(guest_kernel_dir=str(KERNELS))
    caps = MicrovmBackend.probe(vm)
    if not caps.available:
        pytest.skip(f"microvm backend unavailable here: {'; '.join(caps.missing)}")
    return vm


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def vm_engine(
    vm_settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> AsyncIterator[Engine]:
    store, layer = debian_base
    engine = Engine(vm_settings)
    engine.templates.add("debian", store, [layer.digest])
    engine.templates.add("debian-nobody", store, [layer.digest], user="ghost")
    try:
        yield engine
    finally:
        await engine.aclose()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def vm(vm_engine: Engine) -> AsyncIterator[Sandbox]:
    """One VM shared by the tests that only read or write their own files."""
    box = await vm_engine.create("debian", isolation="microvm", limits=LIMITS)
    try:
        yield box
    finally:
        await box.destroy()


def qemu_pids(sandbox_id: str) -> list[int]:
    """QEMU processes whose command line names the sandbox's directory."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if argv[0].endswith(b"qemu-system-x86_64") and any(sandbox_id.encode() in a for a in argv):
            found.append(int(entry))
    return found


@pytest.mark.asyncio(loop_scope="module")
async def test_the_guest_sees_its_limits_name_and_user(vm: Sandbox) -> None:
    done = await vm.run(["sh", "-c", "nproc; hostname; id -un; grep MemTotal /proc/meminfo"])
    cpus, hostname, user, meminfo = done.stdout.decode().splitlines()
    assert (done.exit_code, cpus, hostname, user) == (0, "2", vm.id.replace("_", "-"), "user")
    # The guest's RAM is -m: the kernel keeps a few MiB of it for itself.
    total_kib = int(meminfo.split()[1])
    assert 384 * 1024 - 64 * 1024 < total_kib <= 384 * 1024
    # Its own kernel, not the host's.
    assert (await vm.run(["uname", "-r"])).stdout.decode().strip() != os.uname().release


@pytest.mark.asyncio(loop_scope="module")
async def test_files_and_commands_go_through_the_agent(vm: Sandbox) -> None:
    await vm.write_file("/workspace/note.txt", b"\x00binary\xffclean\n" * 1000)
    assert await vm.read_bytes("/workspace/note.txt") == b"\x00binary\xffclean\n" * 1000
    done = await vm.run(["sh", "-c", "wc -c < /workspace/note.txt; cat /etc/os-release"])
    assert done.stdout.decode().splitlines()[0] == "14000"
    assert "Debian" in done.stdout.decode()
    # The template's root is read-only underneath; writes land on the sandbox's disk.
    done = await vm.run(["sh", "-c", "echo x > /etc/changed && cat /etc/changed"], user="root")
    assert (done.exit_code, done.stdout) == (0, b"x\n")


@pytest.mark.asyncio(loop_scope="module")
async def test_qemu_runs_unprivileged_in_the_sandbox_cgroup(vm: Sandbox) -> None:
    (pid,) = qemu_pids(vm.id)
    with open(f"/proc/{pid}/status") as f:
        uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
    assert "0" not in uids
    with open(f"/proc/{pid}/cgroup") as f:
        assert vm.id in f.read()
    # The cgroup's memory limit is the guest's RAM plus QEMU's own (VMM_OVERHEAD_MIB).
    for directory in cgroup_dirs(vm.id):
        for name in ("memory.max", "memory.limit_in_bytes"):
            if (directory / name).exists():
                assert int((directory / name).read_text()) == (384 + 128) << 20


@pytest.mark.asyncio(loop_scope="module")
async def test_what_the_tier_cannot_do_is_refused_before_anything_is_made(
    vm_engine: Engine, vm_settings: Settings
) -> None:
    before = set((vm_settings.runtime_dir / "sandboxes").iterdir())
    with pytest.raises(IsolationUnavailable, match="layer template such as `base`"):
        await vm_engine.create("host", isolation="microvm")
    with pytest.raises(IsolationUnavailable, match="cannot enforce network mode 'internet'"):
        await vm_engine.create("debian", isolation="microvm", network="internet")
    assert set((vm_settings.runtime_dir / "sandboxes").iterdir()) == before


def test_kvm_is_used_where_it_runs_guests(vm_settings: Settings) -> None:
    kernel = guest_kernel.extract(kernel_dir(vm_settings))
    initramfs = guest_kernel.initramfs(kernel, vm_settings.data_dir / "microvm")
    reason = kvm_reason(str(kernel.vmlinuz), str(initramfs))
    details = MicrovmBackend.probe(vm_settings).details
    if reason is not None:
        assert details["platform"] == f"tcg (no KVM: {reason})"
        pytest.skip(f"no KVM here: {reason}")
    assert details["platform"] == "kvm"


def test_a_missing_kernel_says_how_to_get_one(settings: Settings, tmp_path: Path) -> None:
    caps = MicrovmBackend.probe(settings.with_(guest_kernel_dir=str(tmp_path)))
    assert not caps.available
    assert any("make setup" in m and str(tmp_path) in m for m in caps.missing)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_a_failed_boot_says_why_and_leaves_nothing(
    vm_engine: Engine, vm_settings: Settings
) -> None:
    before = set((vm_settings.runtime_dir / "sandboxes").iterdir())
    with pytest.raises(SandboxStartFailed, match="runs as user 'ghost'"):
        await vm_engine.create("debian-nobody", isolation="microvm", limits=LIMITS)
    assert set((vm_settings.runtime_dir / "sandboxes").iterdir()) == before


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_destroy_stops_qemu_and_removes_its_disk(
    vm_engine: Engine, vm_settings: Settings
) -> None:
    box = await vm_engine.create("debian", isolation="microvm", limits=Limits(memory_mib=256))
    assert qemu_pids(box.id)
    disk = vm_settings.data_dir / "disks" / f"{box.id}.img"
    assert disk.exists()
    await box.destroy()
    assert not qemu_pids(box.id) and not disk.exists()
    assert not (vm_settings.runtime_dir / "sandboxes" / box.id).exists()


def test_a_bad_kernel_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IsolationUnavailable, match="no guest kernel"):
        guest_kernel.extract(tmp_path)
