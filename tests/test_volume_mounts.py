"""Volumes at the engine: an ext4 image mounted into sandboxes of any uid slot, bounded,
read-only when asked, one file system however many sandboxes share it, nothing left on the
host after the last user goes, and symlinks written in it harmless to the host."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest, VolumeInUse
from corral.images import LayerStore, tree_digest
from corral.isolation import Engine
from corral.isolation.volumes import (
    VolumeMount,
    create_image,
    delete_image,
    in_use,
    used_bytes,
)
from tests.conftest import require_backend
from tests.kit import rootless as rootless_kit
from tests.kit.debian import base_layer, needs_archive
from tests.kit.polling import wait_until

pytestmark = pytest.mark.sandbox


@pytest.fixture
def image(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    require_backend(settings, "namespace")
    path = settings.data_dir / "volumes" / "test" / f"{tmp_path.name[-40:]}.img"
    create_image(path, 64 << 20)
    yield path
    path.unlink(missing_ok=True)


def loops_of(image: Path) -> list[str]:
    return [
        backing.parent.parent.name
        for backing in Path("/sys/block").glob("loop*/loop/backing_file")
        if backing.read_text().strip() == str(image)
    ]


async def test_data_outlives_the_sandbox_and_any_uid_slot_owns_it(
    engine: Engine, image: Path
) -> None:
    first = await engine.create(isolation="namespace", volumes=[VolumeMount("v", image, "/data")])
    second = await engine.create(
        isolation="namespace", volumes=[VolumeMount("v", image, "/workspace/shared")]
    )
    try:
        ran = await first.run(["sh", "-c", "mkdir /data/d && echo hello > /data/d/f && id -u"])
        assert ran.exit_code == 0, ran.stderr
        # Both at once, from different host uids: one file system, each owns every file.
        assert first.footprint.uid_slot != second.footprint.uid_slot
        ran = await second.run(
            ["sh", "-c", "cat shared/d/f && echo more >> shared/d/f && stat -c %u shared/d/f"]
        )
        assert ran.exit_code == 0, ran.stderr
        assert ran.stdout.decode().split() == ["hello", "1000"]
        assert len(loops_of(image)) == 1
        assert in_use(image)
        with pytest.raises(VolumeInUse):
            delete_image(image)
    finally:
        await first.destroy()
        await second.destroy()
    third = await engine.create(isolation="namespace", volumes=[VolumeMount("v", image, "/data")])
    try:
        ran = await third.run(["sh", "-c", "cat /data/d/f; touch /data/d/g"])
        assert ran.exit_code == 0, ran.stderr
        assert ran.stdout.decode().split() == ["hello", "more"]
    finally:
        await third.destroy()
    # No mount, no loop device once the last user is gone; then it may be deleted.
    assert not in_use(image)
    assert str(image) not in Path("/proc/self/mounts").read_text()
    delete_image(image)
    assert not image.exists()


async def test_read_only_mount_refuses_writes(engine: Engine, image: Path) -> None:
    box = await engine.create(
        isolation="namespace", volumes=[VolumeMount("v", image, "/data", read_only=True)]
    )
    try:
        ran = await box.run(["sh", "-c", "ls /data && touch /data/x"])
        assert ran.exit_code != 0
        assert "Read-only file system" in ran.stderr.decode()
    finally:
        await box.destroy()


async def test_size_bound_is_enospc_inside(engine: Engine, image: Path) -> None:
    box = await engine.create(isolation="namespace", volumes=[VolumeMount("v", image, "/data")])
    try:
        ran = await box.run(["sh", "-c", "dd if=/dev/zero of=/data/big bs=1M count=200"])
        assert ran.exit_code != 0
        assert "No space left on device" in ran.stderr.decode()
    finally:
        await box.destroy()
    # The image never grows past its size on the host.
    assert image.stat().st_size == 64 << 20
    assert image.stat().st_blocks * 512 <= 64 << 20


async def test_deleted_files_give_the_host_its_disk_back(engine: Engine, image: Path) -> None:
    box = await engine.create(isolation="namespace", volumes=[VolumeMount("v", image, "/data")])
    try:
        ran = await box.run(["sh", "-c", "head -c 20000000 /dev/urandom > /data/f; sync"])
        assert ran.exit_code == 0, ran.stderr
        assert used_bytes(image) > 20_000_000
        ran = await box.run(["sh", "-c", "rm /data/f; sync"])
        assert ran.exit_code == 0, ran.stderr
        wait_until(lambda: used_bytes(image) < 4_000_000, "the image's blocks to be freed")
    finally:
        await box.destroy()


async def test_symlinks_in_a_volume_resolve_inside_the_sandbox(
    engine: Engine, image: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    box = await engine.create(isolation="namespace", volumes=[VolumeMount("v", image, "/data")])
    try:
        ran = await box.run(
            ["sh", "-c", f"ln -s {secret} /data/link && ln -s /etc/shadow /data/shadow && "
             "cat /data/link; echo ---; echo pwned > /data/link"]
        )  # fmt: skip
        assert "host only" not in ran.stdout.decode()
    finally:
        await box.destroy()
    assert secret.read_text() == "host only\n"
    # A later sandbox follows it inside its own tree too.
    box = await engine.create(isolation="namespace", volumes=[VolumeMount("v", image, "/data")])
    try:
        ran = await box.run(["sh", "-c", "readlink /data/link; cat /data/link"])
        assert "host only" not in ran.stdout.decode()
    finally:
        await box.destroy()
    assert secret.read_text() == "host only\n"


@pytest.mark.parametrize(
    "path",
    ["data", "/", "/proc/x", "/dev", "/sys/fs", "/.corral/agent", "/etc/passwd", "/a/../etc",
     "/a//b", "/a/", "/a/./b"],
)  # fmt: skip
async def test_bad_mount_paths_are_refused_before_anything_starts(
    engine: Engine, image: Path, path: str
) -> None:
    with pytest.raises(InvalidRequest, match="mount path"):
        await engine.create(isolation="namespace", volumes=[VolumeMount("v", image, path)])
    assert not loops_of(image)


async def test_overlapping_paths_are_refused(engine: Engine, image: Path) -> None:
    mounts = [VolumeMount("a", image, "/data"), VolumeMount("b", image, "/data/inner")]
    with pytest.raises(InvalidRequest, match="overlaps"):
        await engine.create(isolation="namespace", volumes=mounts)


_OWNER = """
import asyncio
from pathlib import Path
from corral.config import Settings
from corral.images import LayerStore, tree_digest
from corral.isolation import Engine
from corral.isolation.volumes import VolumeMount

async def main():
    settings = Settings(**{k: Path(v) if k.endswith("dir") else v for k, v in %r.items()})
    engine = Engine(settings)
    box = await engine.create(
        isolation="namespace", volumes=[VolumeMount("v", Path(%r), "/data")]
    )
    await box.run(["sh", "-c", "echo x > /data/x"])
    print(box.id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_the_reaper_unmounts_the_volume_of_a_sigkilled_owner(
    settings: Settings, image: Path
) -> None:
    fields = {
        "data_dir": str(settings.data_dir),
        "runtime_dir": str(settings.runtime_dir),
        "cgroup_parent": settings.cgroup_parent,
    }
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER % (fields, str(image))], stdout=subprocess.PIPE, text=True
    ) as owner:
        assert owner.stdout is not None
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id.startswith("sb_"), sandbox_id
        assert in_use(image)
        owner.send_signal(signal.SIGKILL)
    Engine(settings)  # reaps at its start
    wait_until(lambda: not in_use(image) and not loops_of(image), "the reaper", timeout=10)
    delete_image(image)  # no longer refused


def test_processes_attaching_at_once_share_one_loop_device(settings: Settings, image: Path) -> None:
    """Two loop devices on one image would be two ext4 file systems writing the same
    blocks: every process finds the one that backs it, under the image's lock."""
    fields = {
        "data_dir": str(settings.data_dir),
        "runtime_dir": str(settings.runtime_dir),
        "cgroup_parent": settings.cgroup_parent,
    }
    owners = [
        subprocess.Popen(
            [sys.executable, "-c", _OWNER % (fields, str(image))], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    try:
        for owner in owners:
            assert owner.stdout is not None
            assert owner.stdout.readline().startswith("sb_")
        assert len(loops_of(image)) == 1
    finally:
        for owner in owners:
            owner.kill()
            owner.wait()
            if owner.stdout is not None:
                owner.stdout.close()
    Engine(settings)  # reaps at its start
    wait_until(lambda: not in_use(image) and not loops_of(image), "the reaper", timeout=10)


async def test_a_layer_template_sandbox_mounts_volumes_too(
    engine: Engine, settings: Settings, image: Path
) -> None:
    store = LayerStore(settings.data_dir / "templates")
    layer = base_layer(store, ["python3"])
    engine.templates.add("debian-vol", store, [layer.digest])
    try:
        box = await engine.create(
            template="debian-vol", isolation="namespace",
            volumes=[VolumeMount("v", image, "/srv/data"), VolumeMount("v", image, "/ro", True)],
        )  # fmt: skip
        try:
            ran = await box.run(["sh", "-c", "echo deb > /srv/data/f && cat /ro/f && touch /ro/g"])
            assert ran.stdout.decode() == "deb\n"
            assert "Read-only file system" in ran.stderr.decode()
        finally:
            await box.destroy()
        assert tree_digest(layer.path) == layer.digest  # the mount point is on its disk
    finally:
        engine.templates.remove("debian-vol")


for _mark in needs_archive("python3"):
    test_a_layer_template_sandbox_mounts_volumes_too = _mark(
        test_a_layer_template_sandbox_mounts_volumes_too
    )


_ROOTLESS = """
import asyncio, sys
from pathlib import Path
from corral.config import Settings
from corral.errors import CorralError
from corral.isolation import Engine
from corral.isolation.volumes import VolumeMount

async def main():
    settings = Settings(**{k: Path(v) if k.endswith("dir") else v for k, v in %r.items()})
    async with Engine(settings) as engine:
        try:
            box = await engine.create(
                isolation="namespace", volumes=[VolumeMount("v", Path(%r), "/data")]
            )
        except CorralError as exc:
            print(type(exc).__name__, exc)
        else:
            await box.destroy()
            print("created")
        print(sorted(p.name for p in (settings.runtime_dir / "sandboxes").iterdir()))

asyncio.run(main())
"""


def test_without_root_a_volume_is_refused_saying_why(settings: Settings, image: Path) -> None:
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
             "--clear-groups", "--", sys.executable, "-c", _ROOTLESS % (fields, str(image))],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, leftovers = done.stdout.splitlines()
    assert first.startswith("IsolationUnavailable volumes need Corral to run as root"), first
    assert leftovers == "[]"  # nothing of the refused sandbox stays
