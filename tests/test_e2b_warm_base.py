"""E2B's default create (template `base`, default options) takes a sandbox from a warm
pool of the server's base, as Corral's `host` creates do: the first create of `base`
starts that pool (and is cold: it registers the template), later ones claim from it. A
claimed sandbox is what a cold one would be: its user, home, envs and template. Through
a real server (its base from tests/kit/e2b_base.py) and E2B's REST API on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral import Sandbox
from corral.config import Settings
from tests.conftest import LiveServer, opts, start_server
from tests.kit import e2b_base
from tests.kit.polling import wait_until

pytestmark = [pytest.mark.sandbox, *e2b_base.needs_base()]


@pytest.fixture(scope="module")
def pooled_server(settings: Settings) -> Iterator[LiveServer]:
    data = settings.runtime_dir / "warm-base-data"
    e2b_base.install(data)
    server = start_server(settings, data, pool_size=1)
    try:
        yield server
    finally:
        server.stop()


def _create(server: LiveServer, body: dict[str, Any]) -> str:
    response = httpx.post(
        f"{server.url}/v2/sandboxes", json=body, headers={"X-API-KEY": server.key}, timeout=60
    )
    assert response.status_code == 201, response.text
    sandbox_id: str = response.json()["sandboxID"]
    return sandbox_id


def _reason(server: LiveServer, sandbox_id: str) -> str:
    box = Sandbox.connect(sandbox_id, **opts(server))
    try:
        return box.info.state_reason
    finally:
        box.close()


def _kill(server: LiveServer, sandbox_id: str) -> None:
    box = Sandbox.connect(sandbox_id, **opts(server))
    try:
        box.kill()
    finally:
        box.close()


def test_default_e2b_creates_of_base_come_from_a_warm_pool(pooled_server: LiveServer) -> None:
    first = _create(pooled_server, {"templateID": "base"})
    assert _reason(pooled_server, first) == "created"  # the pool starts now
    _kill(pooled_server, first)
    warm: list[str] = []

    def claimed() -> bool:
        sandbox_id = _create(pooled_server, {"templateID": "base", "envVars": {"FOO": "bar"}})
        if _reason(pooled_server, sandbox_id) == "created from the warm pool":
            warm.append(sandbox_id)
            return True
        _kill(pooled_server, sandbox_id)  # the pool was still filling
        return False

    wait_until(claimed, "a create of base from the warm pool", timeout=60, interval=0.5)
    box = Sandbox.connect(warm[0], **opts(pooled_server))
    try:  # what a cold sandbox of base would be: its user, home, envs and tools
        done = box.commands.run("id -un; pwd; echo $FOO; test -x /usr/bin/sudo && echo base")
        assert done.stdout.split() == ["user", "/home/user", "bar", "base"], done.stderr
        box.kill()
    finally:
        box.close()
