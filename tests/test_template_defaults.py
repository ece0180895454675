"""A template's default limits and network policy, end to end on a real server: given at
build time (SDK builder, recipe keys, CLI options), shown by Get/List, applied to what a
sandbox Create or a job submit leaves unset (the request's own values win), checked at
build time (bad ones refused with nothing made), still under the server's caps (network
cap, the host's size, team quotas), and inherited by snapshots."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.client import Jobs, Limits, Network, Sandbox, Template
from corral.config import Settings
from corral.errors import Forbidden, InvalidRequest, QuotaExceeded
from corral.limits import host_memory_mib
from tests.conftest import LiveServer, opts, require_backend, start_server
from tests.kit.debian import MIRROR, needs_archive, suite
from tests.kit.memcg import memory_limit, shmem

pytestmark = [pytest.mark.sandbox, *needs_archive()]

ALLOW = Network("allowlist", ("pypi.org",))


# Every sandbox made here names its network ("none") unless the server refuses the one
# it would get: none of them may have an uplink (no fake internet here).


def serve(settings: Settings, data: Path, **env: str) -> LiveServer:
    # Only the team `ops` may have internet: the default team may not.
    extra = {"CORRAL_DEBIAN_MIRROR": MIRROR, "CORRAL_NETWORK_INTERNET_TEAMS": "ops", **env}
    return start_server(settings, data, pool_size=0, extra_env=extra)


@pytest.fixture(scope="module")
def data(settings: Settings) -> Path:
    require_backend(settings, "namespace")
    return settings.runtime_dir / f"template-defaults-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def dserver(settings: Settings, data: Path) -> Iterator[LiveServer]:
    live = serve(settings, data)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def base(dserver: LiveServer) -> str:
    """A Debian base whose sandboxes get 300 MiB, half a core, 200 MiB of disk and an
    allowlist by default."""
    template = (
        Template()
        .from_debian(suite(), [])
        .set_limits(memory_mib=300, cpu=0.5, disk_mib=200)
        .set_network(ALLOW)
    )
    info = Template.build(template, "base", **opts(dserver))
    assert info.state == "ready"
    return "base"


def names(server: LiveServer) -> set[str]:
    return {t.name for t in Template.list(**opts(server))}


def test_get_and_list_show_the_defaults(dserver: LiveServer, base: str) -> None:
    info = Template.get(base, **opts(dserver))
    assert info.sandbox_limits == Limits(memory_mib=300, cpu=0.5, disk_mib=200)
    assert info.sandbox_network == ALLOW
    listed = {t.name: t for t in Template.list(**opts(dserver))}
    assert listed[base].sandbox_limits == info.sandbox_limits
    shown = dserver.corral("template", "get", base)
    assert shown.returncode == 0, shown.stderr
    assert "cpu=0.5" in shown.stdout and "allowlist: pypi.org" in shown.stdout


def test_what_a_create_sets_wins_field_by_field(dserver: LiveServer, base: str) -> None:
    with Sandbox.create(
        base, limits=Limits(memory_mib=400), network="none", **opts(dserver)
    ) as sbx:
        limits = sbx.get_info().limits
        assert (limits.memory_mib, limits.cpu, limits.disk_mib) == (400, 0.5, 200)
        assert sbx.get_info().network == Network("none")
    # `host` has no defaults: the server's.
    with Sandbox.create("host", **opts(dserver)) as sbx:
        assert sbx.get_info().limits.memory_mib == 512
        assert sbx.get_info().network == Network("none")


def test_the_servers_caps_apply_to_the_result(dserver: LiveServer, base: str) -> None:
    # The network cap: the default team may not have internet, asked for or not.
    with pytest.raises(Forbidden, match="internet"):
        Sandbox.create(base, network="internet", **opts(dserver))
    # The host's size: more memory than the host has is refused, defaults or not.
    with pytest.raises(InvalidRequest, match="memory_mib"):
        Sandbox.create(base, limits=Limits(memory_mib=host_memory_mib() + 1024), **opts(dserver))
    # The team's quota counts the template's defaults.
    done = dserver.corral("admin", "team", "set", "default", "--max-memory-mib", "256")
    assert done.returncode == 0, done.stderr
    try:
        with pytest.raises(QuotaExceeded, match="memory"):
            Sandbox.create(base, **opts(dserver))
        small = Limits(memory_mib=200)
        with Sandbox.create(base, limits=small, network="none", **opts(dserver)) as sbx:
            assert sbx.get_info().limits.memory_mib == 200
    finally:
        done = dserver.corral("admin", "team", "set", "default", "--max-memory-mib", "65536")
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("defaults", "error", "match"),
    [
        ({"limits": Limits(pids=3)}, InvalidRequest, "pids=3 is out of range"),
        (
            {"limits": Limits(memory_mib=host_memory_mib() + 1024)},
            InvalidRequest,
            "exceeds this host",
        ),
        ({"network": "internet"}, Forbidden, "internet"),
    ],
)
def test_bad_defaults_are_refused_at_build_time_and_nothing_is_made(
    dserver: LiveServer, base: str, defaults: dict[str, object], error: type, match: str
) -> None:
    template = Template().from_template(base)
    if "limits" in defaults:
        template.set_limits(defaults["limits"])  # type: ignore[arg-type]
    if "network" in defaults:
        template.set_network(defaults["network"])  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        Template.build(template, "refused", **opts(dserver))
    assert "refused" not in names(dserver)


def test_recipe_keys_and_cli_options_give_defaults_the_request_wins(
    dserver: LiveServer, base: str, tmp_path: Path
) -> None:
    recipe = (
        f"template: {base}\n"
        "limits: {memory_mib: 256, pids: 100}\n"
        "sandbox_network: {mode: allowlist, allow: [example.org]}\n"
        "steps:\n  - echo hi > /hi\n"
    )
    built = Template.build(
        Template(file_context_path=tmp_path).from_recipe(recipe), "recipe", **opts(dserver)
    )
    assert built.sandbox_limits == Limits(memory_mib=256, pids=100)  # not the base's
    assert built.sandbox_network == Network("allowlist", ("example.org",))

    # The CLI's options win over the recipe's keys, each on its own.
    done = dserver.corral(
        "template", "build", "recipe2", "--recipe", "-", str(tmp_path),
        "--sandbox-memory-mib", "320", "--sandbox-network", "none", "-o", "json",
        input=recipe, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["sandbox_limits"]["memory_mib"] == 320
    assert shown["sandbox_limits"]["pids"] == 100
    assert shown["sandbox_network"]["mode"] == "none"

    bad = recipe.replace("pids: 100", "pids: lots")
    with pytest.raises(InvalidRequest, match="pids"):
        Template.build(
            Template(file_context_path=tmp_path).from_recipe(bad), "recipe3", **opts(dserver)
        )
    bad = recipe.replace("limits:", "limitz:")
    with pytest.raises(InvalidRequest, match="unknown key 'limitz'"):
        Template.build(
            Template(file_context_path=tmp_path).from_recipe(bad), "recipe3", **opts(dserver)
        )
    assert "recipe3" not in names(dserver)


def test_a_snapshot_inherits_its_templates_defaults(dserver: LiveServer, base: str) -> None:
    with Sandbox.create(
        base, limits=Limits(memory_mib=400), network="none", **opts(dserver)
    ) as sbx:
        sbx.commands.run("echo kept > /kept")
        snap = sbx.snapshot("snap")
    assert snap.sandbox_limits == Limits(memory_mib=300, cpu=0.5, disk_mib=200)
    assert snap.sandbox_network == ALLOW
    with Sandbox.create("snap", network="none", **opts(dserver)) as sbx:
        assert sbx.get_info().limits.memory_mib == 300
        assert sbx.commands.run("cat /kept").stdout == "kept\n"


def test_a_ram_disk_asked_through_the_api_holds_writes_in_memory(
    dserver: LiveServer, base: str
) -> None:
    small = Limits(memory_mib=256)
    with Sandbox.create(base, ram_disk=True, limits=small, network="none", **opts(dserver)) as sbx:
        assert sbx.get_info().ram_disk
        held = shmem(sbx.sandbox_id)
        ran = sbx.commands.run("dd if=/dev/zero of=/tmp/f bs=1M count=64 conv=fsync")
        assert ran.exit_code == 0, ran.stderr
        assert shmem(sbx.sandbox_id) - held >= 60 * 1024 * 1024
    # A `host` sandbox's storage is a tmpfs already: the flag is accepted (and shown).
    done = dserver.corral("sandbox", "create", "--ram-disk", "-o", "json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["ram_disk"] is True
    assert dserver.corral("sandbox", "kill", shown["sandbox_id"]).returncode == 0


# Last (it stops the module's server): the same store under a server that allows no
# network but `none`, so what the template's default network reaches is seen, refused.
def test_what_a_request_leaves_unset_takes_the_templates_defaults(
    dserver: LiveServer, base: str, settings: Settings, data: Path
) -> None:
    dserver.stop()
    live = serve(settings, data, CORRAL_NETWORK_MODES="none")
    try:
        # No network asked: the template's allowlist, which this server refuses.
        with pytest.raises(Forbidden, match="allowlist"):
            Sandbox.create(base, **opts(live))
        with Sandbox.create(base, network="none", **opts(live)) as sbx:
            limits = sbx.get_info().limits
            assert (limits.memory_mib, limits.cpu, limits.disk_mib) == (300, 0.5, 200)
            assert limits.pids == 512  # not among the template's defaults: the server's
            assert memory_limit(sbx.sandbox_id) == 300 * 1024 * 1024  # the kernel's
        with Jobs(**opts(live)) as jobs:
            with pytest.raises(Forbidden, match="allowlist"):
                jobs.submit(run="true", template=base)
            job = jobs.submit(run="true", template=base, network="none", limits={"cpu": 1}).job
            assert job.spec["limits"] == {"memory_mib": 300, "cpu": 1, "disk_mib": 200}
            assert job.spec["network"] == "none"
            assert jobs.wait(job.id, timeout=120).state == "succeeded"
    finally:
        live.stop()
