"""What sandbox code can learn about the host: no host paths in its mount table, nothing
from the /proc files that describe the host's hardware, kernel and keys — in agent
sandboxes and one-shot ones alike. And the sandbox still works."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from corral.isolation import Engine, Entrypoint, Sandbox
from tests.conftest import require_backend

pytestmark = [pytest.mark.sandbox, pytest.mark.hostile]

# What runc and Docker mask, and what the attack run read (config.gz, iomem).
SENSITIVE = (
    "config.gz", "iomem", "kallsyms", "keys", "timer_list", "timer_stats",
    "sched_debug", "kcore", "latency_stats", "sysrq-trigger", "acpi", "asound", "scsi",
)  # fmt: skip

# Prints, as JSON, the sandbox's mount table and what it can read of each SENSITIVE entry
# (null: it could not), then proves its writable places work.
PROBE = textwrap.dedent(f"""
    import json, os
    seen = {{}}
    for name in {SENSITIVE!r}:
        path = "/proc/" + name
        try:
            if os.path.isdir(path):
                seen[name] = sorted(os.listdir(path))
            else:
                with open(path, "rb") as f:
                    seen[name] = f.read(1 << 16).decode("latin-1")
        except OSError:
            seen[name] = None
    writable = []
    for place in ("/workspace", "/tmp", "/home/user", "/dev/shm"):
        with open(place + "/probe", "w") as f:
            f.write(place)
        with open(place + "/probe") as f:
            writable.append(f.read())
    with open("/proc/self/mountinfo") as f:
        mountinfo = f.read()
    print(json.dumps({{"mountinfo": mountinfo, "proc": seen, "writable": writable}}))
""")


@pytest.fixture
async def ns_engine(engine: Engine, settings: Settings) -> AsyncIterator[Engine]:
    require_backend(settings, "namespace")
    if os.geteuid() != 0:
        pytest.skip("without root, a sandbox's /etc is bound from the runtime dir (no tmpfs)")
    yield engine


def host_exposes(name: str) -> bool:
    """Whether the host's /proc has `name` with something a non-root user could read."""
    path = Path("/proc", name)
    try:
        if path.is_dir():
            return bool(os.listdir(path))
        return bool(path.stat().st_mode & 0o004) and bool(path.read_bytes()[:1])
    except OSError:
        return False


def check_view(view: dict[str, Any], settings: Settings, box: Sandbox) -> None:
    mountinfo = view["mountinfo"]
    for host_path in {
        str(settings.runtime_dir),
        os.path.realpath(settings.runtime_dir),
        str(box.footprint.path),
    }:
        assert host_path not in mountinfo, mountinfo
    # Nor a part of one (/run/corral is /corral on /run's tmpfs): field 4 is the path of
    # a mount's source within its file system.
    sources = [line.split()[3] for line in mountinfo.splitlines()]
    assert not [s for s in sources if "corral" in s], mountinfo
    for name, content in view["proc"].items():
        assert not content, f"/proc/{name} reads {str(content)[:200]!r}"
    assert view["writable"] == ["/workspace", "/tmp", "/home/user", "/dev/shm"]


async def test_the_host_reproduces_the_attack(settings: Settings) -> None:
    """What the attack read is there to read on this host (else the tests below prove
    nothing here): a runtime dir path to see, and host details in /proc."""
    require_backend(settings, "namespace")
    assert "corral" in str(settings.runtime_dir)
    assert host_exposes("config.gz") or host_exposes("iomem") or host_exposes("kallsyms")


async def test_an_agent_sandbox_sees_no_host_paths_or_host_details(
    ns_engine: Engine, settings: Settings
) -> None:
    box = await ns_engine.create(isolation="namespace")
    try:
        result = await box.run(["python3", "-c", PROBE])
        assert result.ok, result.stderr
        check_view(json.loads(result.stdout), settings, box)
        # The agent's own file operations work as before.
        await box.write_file("/workspace/file", b"data")
        assert await box.read_bytes("/workspace/file") == b"data"
        assert (await box.run(["cat", "/etc/hostname"])).stdout.strip() == box.id.replace(
            "_", "-"
        ).encode()
    finally:
        await box.destroy()


async def test_a_one_shot_sandbox_sees_no_host_paths_or_host_details(
    ns_engine: Engine, settings: Settings
) -> None:
    box = await ns_engine.create(
        isolation="namespace", entrypoint=Entrypoint(["python3", "-c", PROBE])
    )
    try:
        assert box.entry is not None
        result = await box.entry.collect()
        assert result.ok, result.stderr
        check_view(json.loads(result.stdout), settings, box)
    finally:
        await box.destroy()


def shared_leftovers(settings: Settings) -> tuple[list[str], list[str]]:
    root = settings.runtime_dir / "sandboxes"
    dirs = [p.name for p in root.iterdir() if p.name.startswith("shared_")]
    mounts = [
        line for line in Path("/proc/self/mounts").read_text().splitlines() if "/shared_" in line
    ]
    return dirs, mounts


async def test_what_sandboxes_share_is_released_with_the_engine(settings: Settings) -> None:
    """The tmpfs their /etc and agent are bound from goes when the engine closes."""
    require_backend(settings, "namespace")
    before = shared_leftovers(settings)
    async with Engine(settings) as engine, await engine.create(isolation="namespace") as box:
        assert (await box.run(["true"])).ok
    assert shared_leftovers(settings) == before
