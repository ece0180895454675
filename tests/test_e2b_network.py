"""E2B's network options enforced by the kernel, in the fake internet: a `corral server`
in the gateway namespace (tests/test_network_acceptance.py's), E2B's REST calls made
there, and a sandbox's fetches of the fake internet's hosts succeeding or failing as the
options say. Nothing here reaches past the fake internet: the gateway has no route out."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tests.kit import internet as fake
from tests.test_network_acceptance import FETCH, GatewayServer, fetched, gw

pytestmark = [pytest.mark.acceptance, pytest.mark.sandbox]

__all__ = ["gw"]  # the gateway server fixture, shared with the acceptance tests

ALLOWED = f"http://{fake.ALLOWED_V4}/"
DENIED = f"http://{fake.DENIED_V4}/"


def e2b(gw: GatewayServer, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """An E2B REST call made in the gateway (where the server listens): status, JSON."""
    code = textwrap.dedent(f"""
        import json, httpx
        r = httpx.request({method!r}, {gw.url + path!r}, json={body!r},
                          headers={{"X-API-KEY": {gw.key!r}}}, timeout=60)
        print(json.dumps([r.status_code, r.json() if r.content else None]))
    """)
    done = subprocess.run(
        gw.in_gateway([sys.executable, "-c", code]),
        capture_output=True, text=True, env=gw.env, timeout=90, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    status, answer = json.loads(done.stdout.strip().splitlines()[-1])
    return int(status), answer


def reach(gw: GatewayServer, sandbox_id: str) -> dict[str, bool]:
    out = gw.ok("sandbox", "exec", sandbox_id, "--", "python3", "-c", FETCH, ALLOWED, DENIED)
    return {url: not text.startswith("URLError") for url, text in fetched(out).items()}


def test_network_updates_in_e2b_terms_change_what_the_sandbox_reaches(gw: GatewayServer) -> None:
    sid = gw.ok("sandbox", "create", "--network", "internet").strip()
    try:
        path = f"/sandboxes/{sid}/network"
        assert reach(gw, sid) == {ALLOWED: True, DENIED: True}
        # Deny everything but one address: allowOut wins over denyOut, as in E2B.
        only = {"denyOut": ["0.0.0.0/0"], "allowOut": [fake.ALLOWED_V4]}
        assert e2b(gw, "PUT", path, only)[0] == 204
        assert reach(gw, sid) == {ALLOWED: True, DENIED: False}
        assert e2b(gw, "PUT", path, {"allow_internet_access": False})[0] == 204
        assert reach(gw, sid) == {ALLOWED: False, DENIED: False}
        # What Corral cannot enforce is refused, and the policy stays as it was.
        status, answer = e2b(gw, "PUT", path, {"denyOut": [fake.DENIED_V4]})
        assert status == 400 and "cannot deny one public range" in answer["message"]
        assert reach(gw, sid) == {ALLOWED: False, DENIED: False}
        assert e2b(gw, "PUT", path, {})[0] == 204  # every field left out: cleared
        assert reach(gw, sid) == {ALLOWED: True, DENIED: True}
    finally:
        gw.ok("sandbox", "kill", sid)


@pytest.mark.parametrize(
    ("body", "reached"),
    [
        ({"allow_internet_access": False}, {ALLOWED: False, DENIED: False}),
        # The SDK's default: the template's network, else CORRAL_E2B_NETWORK (none).
        ({"allow_internet_access": True}, {ALLOWED: False, DENIED: False}),
        (
            {"network": {"denyOut": ["0.0.0.0/0"], "allowOut": [fake.ALLOWED_V4]}},
            {ALLOWED: True, DENIED: False},
        ),
        ({"network": {"allowOut": [fake.ALLOWED_V4]}}, {ALLOWED: True, DENIED: True}),
    ],
)
def test_network_options_on_create_decide_what_the_sandbox_reaches(
    gw: GatewayServer, body: dict[str, Any], reached: dict[str, bool]
) -> None:
    status, made = e2b(gw, "POST", "/sandboxes", {"templateID": "host", "timeout": 60, **body})
    assert status == 201, made
    try:
        assert reach(gw, made["sandboxID"]) == reached
    finally:
        e2b(gw, "DELETE", f"/sandboxes/{made['sandboxID']}")


def test_a_public_deny_on_create_is_refused_and_nothing_is_made(gw: GatewayServer) -> None:
    before = e2b(gw, "GET", "/v2/sandboxes")[1]
    body = {"templateID": "host", "network": {"denyOut": [fake.DENIED_V4]}}
    status, answer = e2b(gw, "POST", "/sandboxes", body)
    assert status == 400 and "cannot deny one public range" in answer["message"]
    assert e2b(gw, "GET", "/v2/sandboxes")[1] == before
