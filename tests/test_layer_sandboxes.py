"""Sandboxes whose `/` is a layer template: the Debian base (bootstrapped offline from the
local archive, as tests/test_debian_base.py does) overlaid under a disk of each sandbox's
own. The guest agent runs in it; the sandbox writes anywhere in `/`, bounded by its disk;
two sandboxes do not see each other's writes; the layer never changes; nothing is left
after destroy, nor after its owner is SIGKILLed."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import SandboxStartFailed
from corral.images import Layer, LayerStore, tree_digest
from corral.isolation import Engine
from tests.conftest import require_backend
from tests.kit.debian import base_layer, needs_archive, suite
from tests.kit.polling import wait_until

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]


@pytest.fixture(scope="session")
def debian_base(settings: Settings) -> Iterator[tuple[LayerStore, Layer]]:
    """A layer store (in the session's data dir) holding the Debian base as one layer."""
    store = LayerStore(settings.data_dir / "templates")
    layer = base_layer(store, ["python3"])
    yield store, layer


@pytest.fixture
def engine_debian(
    engine: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> Engine:
    require_backend(settings, "namespace")
    store, layer = debian_base
    engine.templates.add("debian", store, [layer.digest], env={"TEMPLATE": "debian"})
    return engine


def leftovers(settings: Settings, sandbox_id: str) -> list[str]:
    """What of sandbox `sandbox_id` is still on the host: mounts, its disk image, a loop
    device backed by it, its footprint directory."""
    left = _on_host(settings, sandbox_id)
    if left and all(item.startswith("loop device") for item in left):
        # The disk is unmounted lazily and its loop device lets go of it when the kernel
        # drops the last reference: soon, not at once (seconds on a loaded host).
        wait_until(lambda: not _on_host(settings, sandbox_id), "the loop device to go")
    return _on_host(settings, sandbox_id)


def _on_host(settings: Settings, sandbox_id: str) -> list[str]:
    left = [
        line for line in Path("/proc/self/mounts").read_text().splitlines() if sandbox_id in line
    ]
    disk = settings.data_dir / "disks" / f"{sandbox_id}.img"
    if disk.exists():
        left.append(f"disk image {disk}")
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        if sandbox_id in backing.read_text():
            left.append(f"loop device {backing.parent.parent.name}")
    if (settings.runtime_dir / "sandboxes" / sandbox_id).exists():
        left.append("footprint directory")
    return left


async def test_guest_agent_runs_in_the_debian_base_and_writes_anywhere_in_root(
    engine_debian: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> None:
    _, layer = debian_base
    box = await engine_debian.create(template="debian", isolation="namespace")
    try:
        # Its own /etc (the layer's, not the host's), its template's environment.
        script = ". /etc/os-release; echo $ID $VERSION_CODENAME $TEMPLATE; id -u; id -un; pwd"
        ran = await box.run(["sh", "-c", script])
        assert ran.exit_code == 0, ran.stderr
        expected = ["debian", suite(), "debian", "1000", "user", "/workspace"]
        assert ran.stdout.decode().split() == expected
        # Its account is in the template's files, which its root may edit (on its disk).
        ran = await box.run(
            ["sh", "-c", "echo extra:x:1001:1001::/:/bin/sh >> /etc/passwd"], user="root"
        )
        assert ran.exit_code == 0, ran.stderr
        # Root-owned places of the template are writable by its root: copies on its disk.
        script = (
            "mkdir -p /usr/local/lib/python3/dist-packages/pkg && "
            "echo 'print(42)' > /usr/local/lib/python3/dist-packages/pkg/mod.py && "
            "echo written > /etc/x && echo appended >> /etc/os-release && "
            "python3 /usr/local/lib/python3/dist-packages/pkg/mod.py && cat /etc/x"
        )
        ran = await box.run(["sh", "-c", script], user="root")
        assert ran.exit_code == 0, ran.stderr
        assert ran.stdout.decode().split() == ["42", "written"]
        # File operations through the agent, in the workspace and in /etc.
        await box.write_file("/workspace/hello.txt", b"hi\n")
        assert await box.read_bytes("/workspace/hello.txt") == b"hi\n"
        assert await box.read_bytes("/etc/x") == b"written\n"
        # Its mount table names no host path (no runtime dir, no data dir).
        mountinfo = (await box.read_bytes("/proc/self/mountinfo")).decode()
        assert " / / " in mountinfo
        for host_path in (str(settings.runtime_dir), str(settings.data_dir)):
            assert host_path not in mountinfo
    finally:
        await box.destroy()
    assert leftovers(settings, box.id) == []
    assert not (layer.path / "etc" / "x").exists()
    assert tree_digest(layer.path) == layer.digest


async def test_two_sandboxes_of_a_template_do_not_see_each_others_writes(
    engine_debian: Engine,
) -> None:
    first = await engine_debian.create(template="debian", isolation="namespace")
    second = await engine_debian.create(template="debian", isolation="namespace")
    try:
        ran = await first.run(
            ["sh", "-c", "echo first > /etc/mine && echo first > /usr/local/mine"], user="root"
        )
        assert ran.exit_code == 0, ran.stderr
        ran = await second.run(["sh", "-c", "ls /etc/mine /usr/local/mine"])
        assert ran.exit_code != 0
        assert "No such file" in ran.stderr.decode()
    finally:
        await first.destroy()
        await second.destroy()


async def test_disk_limit_is_enospc_inside_and_the_host_is_untouched(
    engine_debian: Engine, settings: Settings
) -> None:
    from corral.limits import Limits

    box = await engine_debian.create(
        template="debian", isolation="namespace", limits=Limits(disk_mib=64)
    )
    disk = settings.data_dir / "disks" / f"{box.id}.img"
    try:
        assert disk.stat().st_size == 64 << 20
        # More than the disk holds, written into the template's /usr.
        ran = await box.run(
            ["sh", "-c", "dd if=/dev/zero of=/usr/big bs=1M count=200 2>&1; echo rc=$?"],
            user="root",
        )
        assert "No space left on device" in ran.stdout.decode()
        assert "rc=1" in ran.stdout.decode()
        # The host's file system holds at most the disk's size for it.
        assert disk.stat().st_blocks * 512 <= 64 << 20
        # It still works after: deleting frees its space.
        script = "rm /usr/big && echo ok > /etc/after && cat /etc/after"
        ran = await box.run(["sh", "-c", script], user="root")
        assert ran.stdout.decode().strip() == "ok", ran.stderr
    finally:
        await box.destroy()
    assert leftovers(settings, box.id) == []


_OWNER = """
import asyncio, sys
from pathlib import Path
from corral.config import Settings
from corral.images import LayerStore
from corral.isolation import Engine

async def main():
    settings = Settings(**{k: Path(v) if k.endswith("dir") else v for k, v in %r.items()})
    engine = Engine(settings)
    engine.templates.add("debian", LayerStore(Path(%r)), [%r])
    box = await engine.create(template="debian", isolation="namespace")
    await box.run(["sh", "-c", "echo x > /etc/owned"], user="root")
    print(box.id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_reaper_removes_the_disk_and_mounts_of_a_sigkilled_owner(
    settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> None:
    require_backend(settings, "namespace")
    store, layer = debian_base
    fields = {
        "data_dir": str(settings.data_dir),
        "runtime_dir": str(settings.runtime_dir),
        "cgroup_parent": settings.cgroup_parent,
        "allow_process_backend": True,
    }
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER % (fields, str(store.root), layer.digest)],
        stdout=subprocess.PIPE,
        text=True,
    ) as owner:
        assert owner.stdout is not None
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id.startswith("sb_"), sandbox_id
        assert leftovers(settings, sandbox_id) != []
        # Its spare disks too (mounted ahead, in footprints of their own).
        spares = wait_until(lambda: spare_disks(settings, owner.pid) or None, "a spare disk")
        assert spares
        owner.send_signal(signal.SIGKILL)
    Engine(settings)  # reaps at its start
    wait_until(lambda: leftovers(settings, sandbox_id) == [], "the reaper", timeout=10)
    assert json.dumps(leftovers(settings, sandbox_id)) == "[]"
    mounts = Path("/proc/self/mounts").read_text()
    for image, mount in spares.items():
        assert mount not in mounts and not Path(image).exists()
    assert tree_digest(layer.path) == layer.digest


async def test_disks_are_formatted_and_mounted_ahead_and_taken_whole(
    engine_debian: Engine, settings: Settings
) -> None:
    from corral.limits import Limits

    limits = Limits(disk_mib=48)
    first = await engine_debian.create(template="debian", isolation="namespace", limits=limits)
    await first.destroy()
    ready = wait_until(lambda: len(spare_disks(settings)) >= 2 or None, "two spare disks")
    assert ready
    spares = spare_disks(settings)
    for mount in spares.values():  # mounted, with the overlay's directories made
        assert f" {mount} " in Path("/proc/self/mounts").read_text()
        assert sorted(p.name for p in Path(mount).iterdir()) == [
            "lost+found",
            "shm",
            "upper",
            "work",
        ]
    inodes = {Path(image).stat().st_ino for image in spares}
    second = await engine_debian.create(template="debian", isolation="namespace", limits=limits)
    try:
        disk = settings.data_dir / "disks" / f"{second.id}.img"
        assert disk.stat().st_ino in inodes  # a spare, renamed into place
        ran = await second.run(["sh", "-c", "df -k / | tail -1"])
        assert ran.exit_code == 0, ran.stderr
        assert 40 << 10 < int(ran.stdout.split()[1]) <= 48 << 10  # its `/` is its disk
    finally:
        await second.destroy()
    assert leftovers(settings, second.id) == []
    # Closing the engine unmounts and removes its spares.
    await engine_debian.aclose()
    mounts = Path("/proc/self/mounts").read_text()
    for mount in spares.values():
        assert mount not in mounts
    assert not [i for i in spare_disks(settings) if Path(i).stat().st_ino in inodes]


def spare_disks(settings: Settings, owner: int | None = None) -> dict[str, str]:
    """The mounted spare disks (image: mount point) of the process `owner` (default: this
    one); not those being made (or released by a closed engine's filler) meanwhile."""
    mounts = Path("/proc/self/mounts").read_text()
    found = {}
    for state in (settings.runtime_dir / "sandboxes").glob("spare_*/state.json"):
        try:
            record = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if record["owner_pid"] != (owner or os.getpid()) or not record["disk"]:
            continue
        if record["mounts"] and f" {record['mounts'][0]} " in mounts:
            found[record["disk"]] = record["mounts"][0]
    return found


@pytest.mark.parametrize("place", ["tmp", "home"])
async def test_a_layer_symlink_out_of_the_root_does_not_give_the_sandbox_a_host_dir(
    engine: Engine, settings: Settings, tmp_path: Path, place: str
) -> None:
    """The host (root) makes /workspace, /home/user and /tmp in the sandbox's root: a
    layer whose /tmp or /home is a symlink to a host directory must not make the host
    chown or chmod that directory to the sandbox."""
    require_backend(settings, "namespace")
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    before = victim.stat()
    store = LayerStore(settings.data_dir / "templates")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(place)
        info.type, info.linkname = tarfile.SYMTYPE, str(victim)
        tar.addfile(info)
    raw.seek(0)
    hostile = store.import_tar(raw)
    engine.templates.add("hostile", store, [hostile.digest])
    try:
        with pytest.raises(SandboxStartFailed, match=f"the template's /{place}"):
            await engine.create(template="hostile", isolation="namespace")
    finally:
        engine.templates.remove("hostile")
    after = victim.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert list(victim.iterdir()) == []
