"""Every sandbox has a boot id of its own (/proc/sys/kernel/random/boot_id), not the
host's: E2B code tells a restarted sandbox from a paused one by it. Layer templates'
sandboxes are tested with `base` (tests/test_base_template.py); this is `host`'s."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.isolation import Sandbox
from corral.isolation.guest_view import BOOT_ID

pytestmark = pytest.mark.sandbox


async def test_a_host_sandbox_has_its_own_boot_id(sandbox: Sandbox) -> None:
    seen = await sandbox.run(["sh", "-c", f"cat {BOOT_ID}; cat {BOOT_ID}; echo x > {BOOT_ID}"])
    first, second = seen.stdout.decode().splitlines()
    assert first == second != Path(BOOT_ID).read_text().strip()
    assert seen.exit_code != 0  # read-only
