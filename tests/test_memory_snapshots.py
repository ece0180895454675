"""Memory snapshots: `Sandbox.checkpoint` writes a sandbox whole (memory, processes,
files) into a directory and destroys it; `Engine.create(restore=...)` brings it back,
its processes still going. A tier without them refuses before anything changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import InvalidRequest, IsolationUnavailable
from corral.isolation import Engine, Sandbox
from corral.isolation.sandbox import SandboxState

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
    with pytest.raises(IsolationUnavailable, match="cannot restore a sandbox from a checkpoint"):
        await engine.create(isolation="namespace", restore=tmp_path)
    assert not engine.sandboxes
    assert not list((engine.settings.runtime_dir / "sandboxes").glob("*"))


async def test_restoring_from_what_is_not_a_directory_is_refused(
    engine: Engine, tmp_path: Path
) -> None:
    with pytest.raises(InvalidRequest, match="is not a directory"):
        await engine.create(isolation="namespace", restore=tmp_path / "missing")
