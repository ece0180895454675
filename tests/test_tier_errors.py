"""Asking for isolation the host cannot give fails with FAILED_PRECONDITION, says what to
install or use instead, and creates nothing: a tier the host lacks (through the API, the
CLI, the SDK and the job queue) and a feature a tier lacks (one-shot sandboxes, volumes,
memory snapshots)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Jobs, Sandbox
from corral.client import Template, Vm, Volume
from corral.config import Settings
from corral.errors import IsolationUnavailable
from corral.isolation import Engine
from corral.isolation.registry import BACKENDS
from corral.isolation.volumes import VolumeMount
from tests.conftest import ISOLATION_TIERS, LiveServer, opts, require_backend, start_server
from tests.kit.connect import call, error
from tests.kit.hostpath import path_without

# The command each tier cannot do without: a host whose PATH lacks it lacks the tier.
TOOLS = {"namespace": "bwrap", "gvisor": "runsc", "microvm": "qemu-system-x86_64"}
ALL_STATES = ["SANDBOX_STATE_" + s for s in ("CREATING", "RUNNING", "PAUSED", "KILLED", "FAILED")]


@pytest.fixture(scope="module")
def bare_host(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH without any tier's command (a host with none of them installed)."""
    return path_without(tmp_path_factory.mktemp("bin"), *TOOLS.values())


@pytest.fixture(scope="module")
def lacking(settings: Settings, bare_host: str) -> Iterator[LiveServer]:
    """A server on a host without any tier's command: only `process` works there."""
    data = settings.runtime_dir / f"lacking-{secrets.token_hex(3)}"
    live = start_server(settings, data, pool_size=0, extra_env={"PATH": bare_host})
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(params=ISOLATION_TIERS)
def missing(request: pytest.FixtureRequest) -> str:
    """A tier the `lacking` server's host lacks (skipped, saying so, until it is built)."""
    name: str = request.param
    if name not in BACKENDS:
        pytest.skip(f"the {name} tier is not registered in corral.isolation.registry yet")
    return name


def sandbox_ids(server: LiveServer) -> set[str]:
    listed = call(server, "List", {"states": ALL_STATES}).json().get("sandboxes", [])
    return {sandbox["id"] for sandbox in listed}


def test_the_api_refuses_a_tier_the_host_lacks_and_says_what_to_install(
    lacking: LiveServer, missing: str
) -> None:
    before = sandbox_ids(lacking)
    response = call(lacking, "Create", {"isolation": missing})
    message = error(response, 400, "failed_precondition")
    assert repr(missing) in message and "install" in message, message
    assert sandbox_ids(lacking) == before


def test_the_cli_and_the_sdk_say_it_too(lacking: LiveServer, missing: str) -> None:
    done = lacking.corral("run", "--isolation", missing, "--", "true")
    assert done.returncode == 3, done.stderr  # EXIT_UNAVAILABLE
    assert "install" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    with pytest.raises(IsolationUnavailable, match="install"):
        Sandbox.create(isolation=missing, **opts(lacking))


def test_a_vm_on_it_is_refused_through_the_cli_and_the_sdk_with_nothing_made(
    lacking: LiveServer, missing: str
) -> None:
    done = lacking.corral("vm", "create", "v", "--language", "python", "--isolation", missing)
    assert done.returncode == 3, done.stderr  # EXIT_UNAVAILABLE
    assert repr(missing) in done.stderr and "install" in done.stderr, done.stderr
    with pytest.raises(IsolationUnavailable, match="install"):
        Vm.create("v", language="python", isolation=missing, **opts(lacking))
    assert Vm.list(all=True, **opts(lacking)) == []
    assert "lang-python" not in {t.name for t in Template.list(**opts(lacking))}  # no build


def test_the_job_queue_refuses_it_with_nothing_queued(lacking: LiveServer, missing: str) -> None:
    with Jobs(**opts(lacking)) as jobs:
        before = len(list(jobs.list()))
        with pytest.raises(IsolationUnavailable, match="install") as refused:
            jobs.submit(command=["true"], isolation=missing)
        assert "corral doctor" in str(refused.value)
        assert len(list(jobs.list())) == before


# -- a feature the tier lacks -----------------------------------------------------------------


def footprints(settings: Settings) -> list[Path]:
    root = settings.runtime_dir / "sandboxes"
    return sorted(p for p in root.glob("sb_*")) if root.exists() else []


async def test_features_a_tier_lacks_are_refused_before_anything_is_created(
    engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    # The process tier has no volumes and no memory snapshots (nor one-shot sandboxes:
    # tests/test_oneshot.py).
    require_backend(settings, "process")
    before = footprints(settings)
    volume = VolumeMount("data", tmp_path / "data.img", "/data")
    refused = {
        "mount volumes": {"volumes": [volume]},
        "no memory snapshots": {"restore": tmp_path},
    }
    for says, asks in refused.items():
        with pytest.raises(IsolationUnavailable, match=says):
            await engine.create(isolation="process", **asks)  # type: ignore[arg-type]
    assert not engine.sandboxes and footprints(settings) == before


def test_the_api_refuses_volumes_on_a_tier_without_them_with_no_row(
    server: LiveServer, sandbox_host: None
) -> None:
    name = f"v-{secrets.token_hex(4)}"
    Volume.create(name, size_mib=8, **opts(server))
    try:
        before = sandbox_ids(server)
        with pytest.raises(IsolationUnavailable, match="cannot mount volumes"):
            Sandbox.create(isolation="process", volumes=[f"{name}:/data"], **opts(server))
        assert sandbox_ids(server) == before
    finally:
        Volume.delete(name, **opts(server))
