"""The harness itself: the SDK, configured only by the environment, reaches the session's
server, and the server has E2B's default template."""

from __future__ import annotations

import errno
import socket

import httpx
from corral_server import CorralServer
from e2b import ConnectionConfig, Sandbox, SandboxState


def test_the_sdk_is_pointed_at_the_session_server(corral: CorralServer) -> None:
    config = ConnectionConfig()
    assert config.api_url == corral.url
    assert config.get_sandbox_url("any-sandbox", "localhost") == corral.url
    assert config.api_key == corral.key
    assert httpx.get(f"{corral.url}/healthz").status_code == 200


def test_sandboxes_of_base_run(sandbox: Sandbox) -> None:
    """E2B's default template is there with no build (installed before the server starts)."""
    assert sandbox.is_running()
    assert sandbox.get_info().state == SandboxState.RUNNING


def test_the_session_reaches_loopback_only() -> None:
    """E2B's tests curl public addresses from their sandboxes: the session (server, its
    sandboxes' uplinks, the SDK) lives in a network namespace with loopback alone."""
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    with socket.socket() as probe:
        assert probe.connect_ex(("192.0.2.1", 80)) == errno.ENETUNREACH
