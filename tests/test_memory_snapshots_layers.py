"""A gvisor sandbox of a layer template writes its files to a host disk that runsc's
checkpoint does not hold: its pause to disk keeps its files alone, as on a tier without
memory snapshots, and says so. Through a real server whose `base` comes from the cached
tar."""

from __future__ import annotations

import pytest

from corral import Sandbox
from corral.config import Settings
from tests.conftest import opts, require_backend
from tests.kit import e2b_base

pytestmark = [pytest.mark.sandbox, *e2b_base.needs_base()]


def test_a_gvisor_sandbox_of_a_layer_template_pauses_to_disk_with_its_files(
    settings: Settings,
) -> None:
    require_backend(settings, "gvisor")
    with (
        e2b_base.server_with_base(settings, "memory-pause-layers") as server,
        Sandbox.create("base", isolation="gvisor", timeout=120, **opts(server)) as sbx,
    ):
        sbx.files.write("/home/user/note", "kept")
        sbx.commands.run(["sleep", "600"], background=True, tag="sleeper")
        sbx.pause(keep_memory=False)
        assert not (server.data_dir / "paused" / f"{sbx.sandbox_id}.checkpoint").exists()
        info = sbx.resume()
        assert "booted from its filesystem" in info.state_reason
        assert sbx.files.read("/home/user/note") == "kept"
        assert [p for p in sbx.commands.list() if p.tag == "sleeper"] == []
