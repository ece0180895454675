"""A layer template's sandboxes on every isolation tier: the template's root filesystem,
writable by its root, files through the agent (tests/conftest.py `tier`)."""

from __future__ import annotations

import pytest

from corral.isolation import Engine
from tests.kit.debian import needs_archive

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]


@pytest.mark.microvm_subset
async def test_a_layer_template_runs_on_every_tier(engine_debian: Engine, tier: str) -> None:
    async with await engine_debian.create(template="debian", isolation=tier) as box:
        # Its own /etc (the template's, not the host's); its root may write there.
        ran = await box.run(["sh", "-c", ". /etc/os-release; echo $ID; id -un"])
        assert ran.stdout.split() == [b"debian", b"user"], ran.stderr
        written = await box.run(["sh", "-c", "echo x > /etc/x && cat /etc/x"], user="root")
        assert written.stdout == b"x\n", written.stderr
        await box.write_file("/workspace/f", b"data")
        assert await box.read_bytes("/workspace/f") == b"data"
