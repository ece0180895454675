"""Named volumes through the API: a real server, the SDK (sync and async), the CLI and a
job. Data outlives sandboxes and a server restart; read-only mounts refuse writes; a
volume in use cannot be deleted; teams never see each other's; bad input changes nothing."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.client import AsyncVolume, Jobs, Sandbox, Volume
from corral.config import Settings
from corral.errors import (
    InvalidRequest,
    QuotaExceeded,
    UnknownVolume,
    VolumeExists,
    VolumeInUse,
)
from corral.volumes import VolumeSpec
from tests.conftest import LiveServer, opts, serve, start_server

# Volumes, their mounts, owners and quotas are the store's: on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.sandbox, pytest.mark.every_database]


@pytest.fixture
def name(server: LiveServer, sandbox_host: None) -> Iterator[str]:
    """A fresh volume name on the session's server (deleted after the test if left)."""
    fresh = f"v-{secrets.token_hex(4)}"
    yield fresh
    with contextlib.suppress(UnknownVolume):
        Volume.delete(fresh, **opts(server))


def test_data_written_by_one_sandbox_is_read_by_the_next(server: LiveServer, name: str) -> None:
    created = Volume.create(name, size_mib=64, **opts(server))
    assert (created.name, created.size_mib) == (name, 64)
    with Sandbox.create(volumes=[f"{name}:/data"], **opts(server)) as box:
        assert box.info.volumes == (VolumeSpec(name, "/data"),)
        assert Sandbox.connect(box.sandbox_id, **opts(server)).info.volumes == box.info.volumes
        listed = {info.sandbox_id: info for info in Sandbox.list(**opts(server))}
        assert listed[box.sandbox_id].volumes == box.info.volumes
        ran = box.commands.run("head -c 1000000 /dev/urandom > /data/blob; echo kept > /data/note")
        assert ran.exit_code == 0, ran.stderr
    with Sandbox.create(
        volumes=[{"name": name, "path": "/workspace/in", "read_only": False}], **opts(server)
    ) as box:
        ran = box.commands.run("cat in/note && stat -c %s in/blob && id -u && stat -c %u in/note")
        assert ran.stdout.split() == ["kept", "1000000", "1000", "1000"]
    info = Volume.get(name, **opts(server))
    assert info.used_bytes >= 1_000_000
    assert [v.name for v in Volume.list(**opts(server))].count(name) == 1


def test_read_only_mount_and_delete_while_mounted(server: LiveServer, name: str) -> None:
    Volume.create(name, size_mib=32, **opts(server))
    box = Sandbox.create(volumes=[f"{name}:/data:ro"], **opts(server))
    try:
        ran = box.commands.run("touch /data/x")
        assert ran.exit_code != 0
        assert "Read-only file system" in ran.stderr
        with pytest.raises(VolumeInUse, match="kill the sandboxes"):
            Volume.delete(name, **opts(server))
        assert Volume.get(name, **opts(server)).name == name  # still there
    finally:
        box.kill()
        box.close()
    Volume.delete(name, **opts(server))
    with pytest.raises(UnknownVolume):
        Volume.get(name, **opts(server))
    assert not list((server.data_dir / "volumes").glob(f"*/{name}.img"))


def test_the_size_bound_is_enospc_inside(server: LiveServer, name: str) -> None:
    Volume.create(name, size_mib=16, **opts(server))
    with Sandbox.create(volumes=[f"{name}:/data"], **opts(server)) as box:
        ran = box.commands.run("dd if=/dev/zero of=/data/big bs=1M count=64")
        assert ran.exit_code != 0
        assert "No space left on device" in ran.stderr
    (image,) = (server.data_dir / "volumes").glob(f"*/{name}.img")
    assert image.stat().st_blocks * 512 <= 16 << 20


def test_another_team_can_neither_see_nor_mount_it(server: LiveServer, name: str) -> None:
    Volume.create(name, size_mib=16, **opts(server))
    other: dict[str, Any] = {
        "server": server.url,
        "api_key": server.new_team(f"t{secrets.token_hex(3)}"),
    }
    with pytest.raises(UnknownVolume):
        Volume.get(name, **other)
    with pytest.raises(UnknownVolume):
        Volume.delete(name, **other)
    assert name not in [v.name for v in Volume.list(**other)]
    with pytest.raises(UnknownVolume):
        Sandbox.create(volumes=[f"{name}:/data"], **other)
    with pytest.raises(UnknownVolume):
        Jobs(**other).submit(run="true", volumes=[f"{name}:/data"])
    # Its own volume of that name is another one.
    Volume.create(name, size_mib=8, **other)
    try:
        assert Volume.get(name, **other).size_mib == 8
        assert Volume.get(name, **opts(server)).size_mib == 16
    finally:
        Volume.delete(name, **other)


@pytest.mark.parametrize(
    "volume",
    ["{}:data", "{}:/", "{}:/proc/self", "{}:/dev/x", "{}:/sys", "{}:/.corral", "{}:/etc/passwd",
     "{}:/a/../etc", "{}:/a//b"],
)  # fmt: skip
def test_bad_mount_paths_are_refused_with_nothing_created(
    server: LiveServer, name: str, volume: str
) -> None:
    Volume.create(name, size_mib=8, **opts(server))
    before = len(Sandbox.list(**opts(server)))
    with pytest.raises(InvalidRequest, match="mount path"):
        Sandbox.create(volumes=[volume.format(name)], **opts(server))
    with pytest.raises(InvalidRequest, match="mount path"):
        Jobs(**opts(server)).submit(run="true", volumes=[volume.format(name)])
    assert len(Sandbox.list(**opts(server))) == before


def test_bad_names_sizes_and_overlaps_are_refused(server: LiveServer, name: str) -> None:
    for bad in ("Upper", "", "-dash", "a/b", "x" * 64, "..", "a b"):
        with pytest.raises(InvalidRequest, match="volume name"):
            Volume.create(bad, size_mib=8, **opts(server))
    for size in (0, -1, 10**7):
        with pytest.raises(InvalidRequest, match="size"):
            Volume.create(name, size_mib=size, **opts(server))
    with pytest.raises(UnknownVolume):
        Volume.get(name, **opts(server))
    Volume.create(name, size_mib=8, **opts(server))
    with pytest.raises(VolumeExists):
        Volume.create(name, size_mib=8, **opts(server))
    with pytest.raises(InvalidRequest, match="overlaps"):
        Sandbox.create(volumes=[f"{name}:/data", f"{name}:/data/x"], **opts(server))
    with pytest.raises(InvalidRequest, match="NAME:/path"):
        Sandbox.create(volumes=[name], **opts(server))
    with pytest.raises(UnknownVolume):
        Sandbox.create(volumes=["no-such-volume:/data"], **opts(server))


async def test_async_sdk_round_trip(server: LiveServer, name: str) -> None:
    info = await AsyncVolume.create(name, size_mib=8, **opts(server))
    assert (await AsyncVolume.get(name, **opts(server))).created_at == info.created_at
    assert name in [v.name for v in await AsyncVolume.list(**opts(server))]
    await AsyncVolume.delete(name, **opts(server))
    with pytest.raises(UnknownVolume):
        await AsyncVolume.get(name, **opts(server))


def test_cli_round_trip(server: LiveServer, name: str) -> None:
    done = server.corral("volume", "create", name, "--size-mib", "32")
    assert done.returncode == 0, done.stderr
    done = server.corral("volume", "list", "-o", "json")
    assert name in [v["name"] for v in json.loads(done.stdout)]
    done = server.corral("run", "--volume", f"{name}:/data", "--", "sh", "-c", "echo hi > /data/f")
    assert done.returncode == 0, done.stderr
    done = server.corral("run", "-v", f"{name}:/data:ro", "--", "cat", "/data/f")
    assert (done.returncode, done.stdout) == (0, "hi\n"), done.stderr
    done = server.corral("sandbox", "create", "--volume", f"{name}:/data")
    assert done.returncode == 0, done.stderr
    sandbox_id = done.stdout.strip()
    done = server.corral("sandbox", "get", sandbox_id)
    assert f"{name}:/data" in done.stdout
    done = server.corral("volume", "rm", name)
    assert done.returncode != 0 and "mounted by a running sandbox" in done.stderr
    assert server.corral("sandbox", "kill", sandbox_id).returncode == 0
    done = server.corral("volume", "get", name, "-o", "json")
    assert json.loads(done.stdout)["used_bytes"] > 0
    done = server.corral("volume", "rm", name)
    assert done.returncode == 0, done.stderr
    done = server.corral("volume", "get", name)
    assert done.returncode != 0 and "no volume named" in done.stderr
    done = server.corral("volume", "create", "Bad")
    assert done.returncode == 2  # --size-mib is required: a usage error


def test_a_job_writes_to_a_volume(server: LiveServer, name: str, tmp_path: Path) -> None:
    Volume.create(name, size_mib=16, **opts(server))
    with Jobs(**opts(server)) as jobs:
        job = jobs.submit(run="echo from-job > /data/out", volumes=[f"{name}:/data"]).job
        assert jobs.wait(job.id, timeout=60).state == "succeeded"
        assert job.spec["volumes"] == [{"name": name, "path": "/data", "read_only": False}]
        # A workflow's steps run through the guest agent: the volume is there too.
        flow = jobs.submit(
            {"kind": "workflow", "steps": [{"run": "cat /in/out"}], "volumes": [f"{name}:/in:ro"]}
        ).job
        assert jobs.wait(flow.id, timeout=60).state == "succeeded"
        logs = b"".join(chunk.data for chunk in jobs.logs(flow.id))
        assert logs == b"from-job\n"
    spec = tmp_path / "job.yaml"
    spec.write_text("run: cat /data/out\n")
    done = server.corral("job", "submit", "-f", str(spec), "-v", f"{name}:/data", "--wait")
    assert done.returncode == 0, done.stderr


def test_volumes_survive_a_server_restart_and_count_against_quotas(
    settings: Settings, sandbox_host: None, tmp_path: Path, database: str
) -> None:
    limits = {"CORRAL_VOLUME_MAX_COUNT": "2", "CORRAL_VOLUME_MAX_MIB": "100"}
    live = start_server(
        settings,
        tmp_path / "data",
        pool_size=0,
        extra_env={**limits, "CORRAL_DATABASE_URL": database},
    )
    try:
        Volume.create("keep", size_mib=60, **opts(live))
        with pytest.raises(QuotaExceeded, match="CORRAL_VOLUME_MAX_MIB"):
            Volume.create("big", size_mib=41, **opts(live))
        Volume.create("small", size_mib=40, **opts(live))
        with pytest.raises(QuotaExceeded, match="CORRAL_VOLUME_MAX_COUNT"):
            Volume.create("third", size_mib=1, **opts(live))
        with Sandbox.create(volumes=["keep:/data"], **opts(live)) as box:
            assert box.commands.run("echo before > /data/f").exit_code == 0
        live.stop()
        port = int(live.url.rsplit(":", 1)[1])
        live.process = serve(port, live.env, live.log)
        with Sandbox.create(volumes=["keep:/data"], **opts(live)) as box:
            assert box.commands.run("cat /data/f").stdout == "before\n"
        assert sorted(v.name for v in Volume.list(**opts(live))) == ["keep", "small"]
    finally:
        live.stop()
