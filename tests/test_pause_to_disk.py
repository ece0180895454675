"""A pause to disk (`pause(keep_memory=False)`, E2B's filesystem-only pause): the
sandbox's files are kept, its processes end, its memory is released (its cgroup is
gone), and resume boots it afresh (a new boot id) with what it wrote; it is kept past
its deadline and outlives its server (a restart adopts it, still paused). Through a
real server whose `base` comes from the cached tar."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Limits, Sandbox, Volume, VolumeSpec
from corral.config import Settings
from corral.errors import CorralError
from tests.conftest import LiveServer, cgroup_dirs, opts, start_server
from tests.kit import e2b_base
from tests.kit.memcg import memory_limit
from tests.kit.polling import wait_until

pytestmark = [pytest.mark.sandbox, *e2b_base.needs_base()]

BOOT_ID = "/proc/sys/kernel/random/boot_id"


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    with e2b_base.server_with_base(settings, "pause-to-disk-data") as server:
        yield server


def _sh(sbx: Sandbox, line: str) -> str:
    done = sbx.commands.run(["/bin/sh", "-c", line])
    assert done.exit_code == 0, (line, done.stdout, done.stderr)
    return str(done.stdout)


def test_files_stay_processes_go_memory_is_released_and_the_boot_id_is_new(
    server: LiveServer,
) -> None:
    with Sandbox.create("base", timeout=120, **opts(server)) as sbx:
        boot = sbx.files.read(BOOT_ID)
        _sh(sbx, "echo kept > /home/user/note && mkdir -p /home/user/d && echo x > /home/user/d/f")
        sbx.commands.run(["sleep", "600"], background=True, tag="sleeper")
        assert cgroup_dirs(sbx.sandbox_id)  # it holds a cgroup while it runs

        info = sbx.pause(keep_memory=False)
        assert info.state == "paused" and info.state_reason == "paused to disk: by request"
        assert cgroup_dirs(sbx.sandbox_id) == []  # no processes, no memory charged
        with pytest.raises(CorralError, match="paused"):
            sbx.files.read("/home/user/note")

        info = sbx.resume()
        assert info.state == "running"
        assert "processes were not kept" in info.state_reason
        assert sbx.files.read("/home/user/note") == "kept\n"
        assert sbx.files.read("/home/user/d/f") == "x\n"
        assert sbx.files.read(BOOT_ID) not in (boot, Path(BOOT_ID).read_text())
        assert "sleep" not in _sh(sbx, "ps -eo comm=")
        assert [p for p in sbx.commands.list() if p.tag == "sleeper"] == []
        # It runs as before: as its template's user, writing where it did.
        assert _sh(sbx, "id -un; echo again >> /home/user/note; cat /home/user/note") == (
            "user\nkept\nagain\n"
        )
        # And it pauses to disk again.
        sbx.pause(keep_memory=False)
        sbx.resume()
        assert sbx.files.read("/home/user/note") == "kept\nagain\n"


def test_a_sandbox_paused_to_disk_outlives_its_deadline_until_killed(
    server: LiveServer,
) -> None:
    sbx = Sandbox.create("base", timeout=120, **opts(server))
    try:
        _sh(sbx, "echo kept > /home/user/note")
        sbx.pause(keep_memory=False)
        sbx.set_timeout(1)
        time.sleep(3)  # well past the deadline: the timers tick every half second
        assert sbx.get_info().state == "paused"
        sbx.set_timeout(120)
        sbx.resume()
        assert sbx.files.read("/home/user/note") == "kept\n"
        sbx.pause(keep_memory=False)
    finally:
        sbx.kill()
    assert sbx.get_info().state == "killed"


def test_a_frozen_pause_still_dies_at_its_deadline(server: LiveServer) -> None:
    """Corral's rule for a pause that holds memory is unchanged."""
    sbx = Sandbox.create("base", timeout=120, **opts(server))
    sbx.pause()
    sbx.set_timeout(1)
    wait_until(
        lambda: sbx.get_info().state == "killed", "the frozen sandbox killed at its deadline"
    )


def test_a_host_sandbox_cannot_pause_to_disk_and_runs_on(server: LiveServer) -> None:
    with Sandbox.create("host", timeout=120, **opts(server)) as sbx:
        _sh(sbx, "echo x > /tmp/f")
        with pytest.raises(CorralError, match="cannot be paused to disk") as caught:
            sbx.pause(keep_memory=False)
        assert "keep_memory=true" in str(caught.value)
        assert sbx.get_info().state == "running"  # never half-paused
        assert _sh(sbx, "cat /tmp/f") == "x\n"
        sbx.pause()  # a frozen pause still works
        sbx.resume()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
def test_a_sandbox_paused_to_disk_survives_a_server_restart(
    settings: Settings, stop: signal.Signals
) -> None:
    data = settings.runtime_dir / f"pause-to-disk-restart-{stop.name}"
    e2b_base.install(data)
    first = start_server(settings, data, pool_size=0)
    try:
        sbx = Sandbox.create("base", timeout=120, **opts(first))
        _sh(sbx, "echo kept > /home/user/note")
        running = Sandbox.create("base", timeout=120, **opts(first))  # not paused: ends
        sbx.pause(keep_memory=False)
    finally:
        first.stop(stop)
    second = start_server(settings, data, pool_size=0)
    try:
        assert Sandbox.connect(running.sandbox_id, resume=False, **opts(second)).info.state in (
            "killed",
            "failed",
        )
        again = Sandbox.connect(sbx.sandbox_id, resume=False, **opts(second))
        assert again.info.state == "paused"
        held = f"*/paused.{sbx.sandbox_id}"  # its layers, held in the layer store
        assert list((data / "templates" / "refs").glob(held))
        again = Sandbox.connect(sbx.sandbox_id, **opts(second))  # resumes it
        assert again.info.state == "running"
        assert again.files.read("/home/user/note") == "kept\n"
        again.kill()
        assert not list((data / "paused").iterdir())  # its image is gone with it
        assert not list((data / "templates" / "refs").glob(held))
    finally:
        second.stop()


def test_the_cli_pauses_to_disk(server: LiveServer) -> None:
    with Sandbox.create("base", timeout=120, **opts(server)) as sbx:
        done = server.corral("sandbox", "pause", "--to-disk", sbx.sandbox_id)
        assert done.returncode == 0 and "paused" in done.stdout, done.stderr
        assert sbx.get_info().state_reason == "paused to disk: by request"
        assert server.corral("sandbox", "resume", sbx.sandbox_id).returncode == 0
        assert sbx.get_info().state == "running"


def test_resume_boots_with_the_same_limits_envs_and_volumes(server: LiveServer) -> None:
    volume = f"v-{secrets.token_hex(4)}"
    Volume.create(volume, size_mib=64, **opts(server))
    try:
        with Sandbox.create(
            "base",
            timeout=120,
            envs={"KEPT": "yes"},
            limits=Limits(memory_mib=384),
            volumes=[f"{volume}:/data"],
            **opts(server),
        ) as sbx:
            _sh(sbx, "echo on-volume > /data/note")
            sbx.pause(keep_memory=False)
            info = sbx.resume()
            assert info.limits.memory_mib == 384
            assert info.volumes == (VolumeSpec(volume, "/data"),)
            assert memory_limit(sbx.sandbox_id) == 384 * 1024 * 1024
            assert _sh(sbx, "echo $KEPT; cat /data/note") == "yes\non-volume\n"
    finally:
        Volume.delete(volume, **opts(server))
