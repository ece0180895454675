"""Shared fixtures: real engines and real sandboxes, on every tier this host offers."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from corral.config import Settings

if TYPE_CHECKING:
    from corral.isolation import Engine, Sandbox

TEST_CGROUP_PARENT = "corral-test"


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    # Not under pytest's tmp_path: its parents are mode 0700, which the sandboxes' own
    # unprivileged uids could not traverse.
    runtime = Path(tempfile.mkdtemp(prefix="corral-test-"))
    yield Settings(
        data_dir=runtime / "data",
        runtime_dir=runtime,
        cgroup_parent=TEST_CGROUP_PARENT,
        allow_process_backend=True,
    )
    shutil.rmtree(runtime, ignore_errors=True)


def require_backend(settings: Settings, name: str) -> None:
    from corral.isolation.registry import backend_class

    caps = backend_class(name).probe(settings)
    if not caps.available:
        pytest.skip(f"{name} backend unavailable here: {'; '.join(caps.missing)}")


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[Engine]:
    from corral.isolation import Engine

    engine = Engine(settings)
    try:
        yield engine
    finally:
        await engine.aclose()


@pytest.fixture
async def sandbox(engine: Engine, settings: Settings) -> AsyncIterator[Sandbox]:
    """A `namespace` sandbox with default limits."""
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace")
    try:
        yield box
    finally:
        await box.destroy()


def host_processes_of_uid(uid: int) -> list[int]:
    """Live host processes running as `uid`.

    Zombies are left out: they are dead and hold nothing but a pid. After a host process is
    SIGKILLed its sandboxes' dead processes are re-parented to the host's pid 1, whose job
    it is to reap them (this CI machine's pid 1 does not).
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid != uid:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if state != b"Z":
                found.append(int(entry))
    return found
