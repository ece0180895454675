"""The harness itself: the SDK, configured only by the environment, reaches the session's
server, and the server has E2B's default template."""

from __future__ import annotations

import json

import httpx
from corral_server import CorralServer
from e2b import ConnectionConfig


def test_the_sdk_is_pointed_at_the_session_server(corral: CorralServer) -> None:
    config = ConnectionConfig()
    assert config.api_url == corral.url
    assert config.get_sandbox_url("any-sandbox", "localhost") == corral.url
    assert config.api_key == corral.key
    assert httpx.get(f"{corral.url}/healthz").status_code == 200


def test_the_base_template_is_ready(corral: CorralServer) -> None:
    listed = corral.corral("template", "get", "base", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["state"] == "ready"
