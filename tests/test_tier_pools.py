"""Warm pools are per (template, tier): a create on one tier never gets another tier's
spare, and a server whose default tier is gvisor or microvm keeps spares of that tier."""

from __future__ import annotations

import pytest

from corral.config import Settings
from corral.sandboxes import CreateOptions
from corral.store import Store
from tests.conftest import StartManager, has_host_template, require_backend
from tests.kit.polling import until

pytestmark = pytest.mark.sandbox


@pytest.mark.microvm_subset
async def test_a_create_gets_a_spare_of_its_own_tier_only(
    managers: StartManager, msettings: Settings, store: Store, tier: str
) -> None:
    # Another tier than the pool's: namespace, or process beside a namespace pool.
    other = "namespace" if tier != "namespace" else "process"
    require_backend(msettings, other)
    team = store.create_team("pools", max_sandboxes=4)
    manager = await managers(msettings.with_(default_isolation=tier), pool_size=1)
    if not has_host_template(tier):
        # No pool of `host` it could never fill (its layer templates' pools are its own).
        assert manager.pool.backend is None
        cold = await manager.create(team, CreateOptions(isolation=other))
        assert (cold.isolation, cold.state_reason) == (other, "created")
        return
    await until(lambda: manager.pool.ready == 1, f"a {tier} spare", timeout=120)
    (spare,) = manager.pool._ready
    assert spare.backend == tier

    cold = await manager.create(team, CreateOptions(isolation=other))
    assert (cold.isolation, cold.state_reason) == (other, "created")
    assert list(manager.pool._ready) == [spare]  # untouched: not the other tier's to take

    warm = await manager.create(team, CreateOptions(isolation=tier))
    assert (warm.id, warm.isolation) == (spare.id, tier)
    assert warm.state_reason == "created from the warm pool"
    box = await manager.running(team, warm.id)
    assert (await box.run(["echo", "warm"])).stdout == b"warm\n"
