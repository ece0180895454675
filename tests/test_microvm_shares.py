"""The microvm tier's host directories over virtio-fs: the `host` template's /usr, volumes
(shared live with namespace sandboxes), read-only ones, and what a hostile guest can do
with them.

Under TCG a boot takes seconds: one VM of the `host` template with two volumes (one
read-only) serves every check here, with one namespace sandbox beside it on a volume.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from corral.config import Settings
from corral.errors import IsolationUnavailable
from corral.isolation import Engine, Sandbox
from corral.isolation.microvm import MicrovmBackend
from corral.isolation.microvm_shares import VIRTIOFSD
from corral.isolation.volumes import VolumeMount, create_image, in_use
from corral.limits import Limits
from tests.kit.polling import wait_until

pytestmark = pytest.mark.sandbox
LIMITS = Limits(cpu=1, memory_mib=384, disk_mib=256)


@pytest.fixture(scope="module")
def volume_images(settings: Settings) -> Iterator[tuple[Path, Path]]:
    caps = MicrovmBackend.probe(settings)
    if not caps.available:
        pytest.skip(f"microvm backend unavailable here: {'; '.join(caps.missing)}")
    directory = settings.data_dir / "test-shares"
    images = (directory / "rw.img", directory / "ro.img")
    for image in images:
        create_image(image, 64 << 20)
    yield images
    for image in images:
        image.unlink(missing_ok=True)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared(
    settings: Settings, volume_images: tuple[Path, Path]
) -> AsyncIterator[tuple[Engine, Sandbox, Sandbox]]:
    """A microvm and a namespace sandbox, both with the volume `rw` at /data; the VM also
    has `ro` read-only at /workspace/ro (a volume inside the workdir)."""
    rw, ro = volume_images
    engine = Engine(settings)
    mounts = [VolumeMount("rw", rw, "/data"), VolumeMount("ro", ro, "/workspace/ro", True)]
    try:
        vm = await engine.create("host", isolation="microvm", limits=LIMITS, volumes=mounts)
        try:
            box = await engine.create(isolation="namespace", volumes=mounts[:1])
            try:
                yield engine, vm, box
            finally:
                await box.destroy()
        finally:
            await vm.destroy()
    finally:
        await engine.aclose()


async def run(box: Sandbox, script: str, user: str | None = None) -> tuple[int, str, str]:
    done = await (await box.exec(["sh", "-c", script], user=user)).collect()
    return done.exit_code, done.stdout.decode(), done.stderr.decode()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_volume_is_shared_live_with_a_namespace_sandbox(
    shared: tuple[Engine, Sandbox, Sandbox],
) -> None:
    _, vm, box = shared
    # Owners as on the namespace tier: the volume's top is `user`'s, and so is what it writes.
    assert await run(vm, "stat -c '%U %a' /data") == (0, "user 755\n", "")
    assert (await run(vm, "echo from-vm > /data/a && stat -c %U /data/a"))[:2] == (0, "user\n")
    assert await run(box, "cat /data/a; stat -c %U /data/a") == (0, "from-vm\nuser\n", "")
    # The other way, seen at once (no cache between them).
    assert (await run(box, "echo from-ns > /data/b"))[0] == 0
    assert await run(vm, "cat /data/b") == (0, "from-ns\n", "")
    # root's files are root's, on both tiers.
    assert (await run(vm, "touch /data/r && chown root /data/r", user="root"))[0] == 0
    assert await run(box, "stat -c %U /data/r") == (0, "root\n", "")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_read_only_volume_stays_read_only_for_the_guests_root(
    shared: tuple[Engine, Sandbox, Sandbox],
) -> None:
    _, vm, _ = shared
    code, _, err = await run(vm, "touch /workspace/ro/x", user="root")
    assert code != 0 and "Read-only" in err
    # The guest's root owns its kernel: it can remount the share read-write, and still
    # not write (the host's mount under the daemon is read-only).
    remount = "/.corral/busybox mount -o remount,rw /workspace/ro"
    code, out, err = await run(vm, f"{remount} && echo rw && touch /workspace/ro/x", user="root")
    assert (out, code != 0, "Read-only" in err) == ("rw\n", True, True), err
    assert (await run(vm, "ls -A /workspace/ro"))[1] == "lost+found\n"


@pytest.mark.asyncio(loop_scope="module")
async def test_the_guest_cannot_leave_the_shared_directory(
    shared: tuple[Engine, Sandbox, Sandbox], settings: Settings
) -> None:
    _, vm, _ = shared
    # A file of the host beside the volume's image.
    marker = settings.data_dir / "test-shares" / "host-secret"
    marker.write_text("host only\n")
    relative = str(marker).lstrip("/")
    # Symlinks and `..` resolve in the guest's own tree, never the host's (the guest's
    # kernel follows them; the daemon is pivoted into the volume).
    script = (
        "ln -s / /data/up && ln -s ../../../../../../.. /data/dots && "
        "cat /data/up/etc/hostname /data/dots/etc/hostname; "
        f"cat /data/up/{relative} /data/dots/{relative} /data/../../../../{relative} "
        f"/data/lost+found/../../../../../{relative}; "
        "ls -a /data/up/"
    )
    _, out, err = await run(vm, script, user="root")
    assert "host only" not in out
    assert out.splitlines()[:2] == [vm.id.replace("_", "-")] * 2
    assert err.count("No such file or directory") == 4, err
    assert set(out.splitlines()[2:]) >= {".corral", "workspace", "data"}
    # The daemons are the sandbox's unprivileged root, never the host's.
    daemons = _daemons(vm.id)
    assert len(daemons) >= 3  # the host's /usr and two volumes
    for pid in daemons:
        assert os.stat(f"/proc/{pid}").st_uid >= settings.uid_base


@pytest.mark.asyncio(loop_scope="module")
async def test_the_host_template_is_the_hosts_usr_read_only_as_on_namespace(
    shared: tuple[Engine, Sandbox, Sandbox],
) -> None:
    _, vm, box = shared
    script = (
        "python3 -c 'import sys; print(sys.version_info[0])'; echo $SHELL; "
        "stat -c '%U %a' /usr /usr/bin/python3; readlink /bin; ls /etc/shadow"
    )
    on_vm, on_namespace = await run(vm, script), await run(box, script)
    assert on_vm[:2] == on_namespace[:2]
    assert on_vm[1].splitlines()[:2] == ["3", "/bin/bash"]
    assert "No such file" in on_vm[2]  # the host's /etc is not there
    # Not even the guest's root, after a remount, writes the host's /usr.
    remount = "/.corral/busybox mount -o remount,rw /usr"
    code, out, err = await run(vm, f"{remount} && echo rw && touch /usr/corral-x", user="root")
    assert (out, code != 0, "Read-only" in err) == ("rw\n", True, True), err
    assert not Path("/usr/corral-x").exists()


def _daemons(sandbox_id: str) -> list[str]:
    """The pids of the virtiofsd processes in the sandbox's cgroup."""
    return [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and _cgroup_of(pid, sandbox_id) and _exe(pid) == VIRTIOFSD
    ]


def _cgroup_of(pid: str, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def _exe(pid: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


@pytest.mark.asyncio(loop_scope="module")
async def test_a_sandbox_with_volumes_refuses_a_memory_snapshot(
    shared: tuple[Engine, Sandbox, Sandbox], volume_images: tuple[Path, Path]
) -> None:
    engine, vm, _ = shared
    with pytest.raises(IsolationUnavailable, match="virtio-fs"):
        await vm.checkpoint(Path("/nonexistent"))
    with pytest.raises(IsolationUnavailable, match="virtio-fs"):
        await engine.create(
            isolation="microvm",
            volumes=[VolumeMount("rw", volume_images[0], "/data")],
            restore=Path("/"),
        )
    assert in_use(volume_images[0])


_OWNER = """
import asyncio
from pathlib import Path
from corral.config import Settings
from corral.isolation import Engine
from corral.isolation.volumes import VolumeMount

async def main():
    settings = Settings(**{k: Path(v) if k.endswith("_dir") else v for k, v in %r.items()})
    box = await Engine(settings).create(
        isolation="microvm", volumes=[VolumeMount("v", Path(%r), "/data")]
    )
    print(box.id, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.slow
def test_the_reaper_stops_the_daemons_of_a_sigkilled_owner(
    settings: Settings, volume_images: tuple[Path, Path]
) -> None:
    image = volume_images[0].with_name("reaped.img")  # the module's VM mounts the others
    create_image(image, 16 << 20)
    fields = {
        "data_dir": str(settings.data_dir),
        "runtime_dir": str(settings.runtime_dir),
        "cgroup_parent": settings.cgroup_parent,
        "guest_kernel_dir": settings.guest_kernel_dir,
    }
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER % (fields, str(image))], stdout=subprocess.PIPE, text=True
    ) as owner:
        assert owner.stdout is not None
        sandbox_id = owner.stdout.readline().strip()
        assert sandbox_id.startswith("sb_"), sandbox_id
        assert in_use(image) and _daemons(sandbox_id)
        owner.send_signal(signal.SIGKILL)
    Engine(settings)  # reaps at its start
    wait_until(lambda: not _daemons(sandbox_id), "the reaper to stop the daemons", timeout=10)
    wait_until(lambda: not in_use(image), "the reaper to unmount the volume", timeout=10)
    mounts = Path("/proc/self/mountinfo").read_text()
    assert sandbox_id not in mounts  # the host's /usr bind and the volume's mount
