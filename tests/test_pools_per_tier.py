"""Warm pools per tier and template (CORRAL_POOLS): a server whose default tier is one
keeps spares of another tier too; a create takes a spare of its own tier and template
only, and the pool refills; `corral doctor` lists the pools and a bad entry is refused."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from corral.client import Sandbox
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.images import Layer, LayerStore
from corral.sandboxes import CreateOptions, SandboxManager
from corral.sandboxes.pool import WarmPool
from corral.store import Store
from tests.conftest import (
    StartManager,
    has_host_template,
    opts,
    require_backend,
    start_server,
    unmet,
)
from tests.kit.debian import needs_archive
from tests.kit.polling import until, wait_until

pytestmark = pytest.mark.sandbox


def pool_of(manager: SandboxManager, tier: str, template: str) -> WarmPool | None:
    found = [p for p in manager.pools if (p.isolation, p.template) == (tier, template)]
    return found[0] if found else None


@pytest.mark.microvm_subset
async def test_a_pool_of_another_tier_than_the_default_serves_its_tier_and_refills(
    managers: StartManager,
    msettings: Settings,
    store: Store,
    tier: str,
    request: pytest.FixtureRequest,
) -> None:
    if reason := unmet(needs_archive("python3")):
        pytest.skip(reason)
    debian_base: tuple[LayerStore, Layer] = request.getfixturevalue("debian_base")
    # The server's default tier is another one: before CORRAL_POOLS its creates of `tier`
    # all started cold.
    default = "gvisor" if tier == "namespace" else "namespace"
    require_backend(msettings, default)
    settings = msettings.with_(default_isolation=default, pools=f"{tier}:base=1")
    manager = await managers(settings, pool_size=0)
    layers, layer = debian_base
    manager.engine.templates.add("debian", layers, [layer.digest])
    manager.resolve_template = lambda team_id, name: name
    manager.poolable = lambda template: template == "debian"  # the server's base, here
    team = store.create_team("tier-pools", max_sandboxes=6)
    on_tier = CreateOptions(template="debian", isolation=tier)

    first = await manager.create(team, on_tier)
    assert first.state_reason == "created"  # it registers the base's pool of its tier
    pool = pool_of(manager, tier, "debian")
    assert pool is not None and pool.size == 1
    await until(lambda: pool.ready == 1, f"a {tier} spare of the base", timeout=120)
    (spare,) = pool._ready

    # Neither another tier (whose base pool has size 0) nor another template takes it.
    other_tier = await manager.create(team, CreateOptions(template="debian", isolation=default))
    assert (other_tier.isolation, other_tier.state_reason) == (default, "created")
    assert pool_of(manager, default, "debian") is None
    if has_host_template(tier):
        host = await manager.create(team, CreateOptions(template="host", isolation=tier))
        assert (host.isolation, host.state_reason) == (tier, "created")
    assert list(pool._ready) == [spare]

    warm = await manager.create(team, on_tier)
    assert (warm.id, warm.isolation, warm.state_reason) == (
        spare.id,
        tier,
        "created from the warm pool",
    )
    box = await manager.running(team, warm.id)
    assert (await box.run(["echo", "warm"])).stdout == b"warm\n"
    await until(lambda: pool.ready == 1, f"the {tier} pool refilled", timeout=120)
    assert pool._ready[0].id != spare.id
    assert pool._ready[0].backend == tier


async def test_pools_of_host_start_on_every_tier_named_and_the_default_keeps_its_size(
    managers: StartManager, msettings: Settings, store: Store
) -> None:
    require_backend(msettings, "gvisor")
    settings = msettings.with_(default_isolation="namespace", pools="gvisor:host=1")
    manager = await managers(settings, pool_size=1)
    gvisor, namespace = pool_of(manager, "gvisor", "host"), pool_of(manager, "namespace", "host")
    assert gvisor is not None and namespace is manager.pool
    await until(lambda: gvisor.ready == 1 and namespace.ready == 1, "both pools full", timeout=60)
    # Both count as spares in the host's admission, like the default tier's pool.
    spare_mib = sum(p.spare_mib() for p in (gvisor, namespace))
    assert spare_mib == 2 * gvisor._ready[0].spec.limits.memory_mib
    assert gvisor in manager.engine._spares and namespace in manager.engine._spares

    team = store.create_team("host-pools", max_sandboxes=4)
    warm = await manager.create(team, CreateOptions(isolation="gvisor"))
    assert (warm.isolation, warm.state_reason) == ("gvisor", "created from the warm pool")
    await until(lambda: gvisor.ready == 1, "the gvisor pool refilled", timeout=60)


def test_a_pools_entry_that_is_not_tier_template_size_is_refused() -> None:
    for bad in ("gvisor", "gvisor:base", "gvisor:mine=1", ":base=1", "gvisor:base=-1"):
        with pytest.raises(InvalidRequest, match="CORRAL_POOLS entry"):
            Settings.from_env({"CORRAL_POOLS": bad})


def doctor(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", "doctor"],
        capture_output=True,
        text=True,
        env={**os.environ, "CORRAL_ALLOW_PROCESS_BACKEND": "1", **env},
        check=False,
    )


async def test_a_server_with_a_pool_of_an_unknown_tier_does_not_start(
    managers: StartManager, msettings: Settings
) -> None:
    with pytest.raises(InvalidRequest, match="CORRAL_POOLS='gvisr:base=1': unknown isolation"):
        await managers(msettings.with_(pools="gvisr:base=1"))


def test_doctor_lists_each_pool() -> None:
    done = doctor(
        CORRAL_DEFAULT_ISOLATION="namespace",
        CORRAL_POOL_SIZE="3",
        CORRAL_POOLS="namespace:base=1,gvisor:base=2,microvm:host=1",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("warm pool"))
    rows = {tuple(line.split()[:3]): line for line in lines[start + 1 :] if line.strip()}
    assert ("namespace", "host", "3") in rows  # CORRAL_POOL_SIZE's
    assert ("namespace", "base", "1") in rows  # CORRAL_POOLS's, in place of CORRAL_POOL_SIZE's
    assert ("gvisor", "base", "2") in rows
    assert rows[("microvm", "host", "1")].split()[3:] == ["yes"]  # its /usr over virtio-fs


def test_a_server_keeps_the_pools_corral_pools_names(settings: Settings) -> None:
    require_backend(settings, "gvisor")
    data = settings.runtime_dir / f"pools-{secrets.token_hex(3)}"
    # No job workers: their own pool (of the default tier) would log its spares too.
    env = {"CORRAL_POOLS": "gvisor:host=1", "CORRAL_LOG_LEVEL": "debug", "CORRAL_JOB_WORKERS": "0"}
    server = start_server(settings, data, pool_size=0, extra_env=env)
    try:
        wait_until(lambda: "warm pool sandbox ready" in server.log.read_text(), "a gvisor spare")
        box = Sandbox.create(isolation="gvisor", **opts(server))
        try:
            info = box.info
            assert (info.isolation, info.state_reason) == ("gvisor", "created from the warm pool")
            assert box.commands.run("echo warm").stdout == "warm\n"
        finally:
            box.kill()
    finally:
        server.stop()
