"""E2B's control-plane REST API and envd's call resolution, on the wire (httpx), against a
real server: keys, create, get, list (filters, order, paging), kill, timeout, pause,
connect, resume, refresh, team isolation and envd access tokens.

Sandboxes use the `host` template (`base` is another helper's); each test has a team of
its own, so lists and quotas see only its sandboxes.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest

from corral.errors import Unauthenticated
from corral.store import Store
from tests.conftest import LiveServer, base_unavailable
from tests.kit.connect import call
from tests.kit.polling import wait_until

# Keys, lists, deadlines and pauses are the store's: on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.usefixtures("sandbox_host"), pytest.mark.every_database]


class E2b:
    """One team's E2B client on the wire: REST with X-API-KEY, envd with the sandbox id."""

    def __init__(self, server: LiveServer, key: str) -> None:
        self.server = server
        self.key = key
        self.http = httpx.Client(base_url=server.url, timeout=60)

    def rest(self, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
        return self.http.request(
            method,
            path,
            json=body,
            params=params or None,
            headers={"X-API-KEY": self.key},
        )

    def create(self, **body: Any) -> dict[str, Any]:
        response = self.rest("POST", "/v2/sandboxes", {"templateID": "host", **body})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def info(self, sandbox_id: str) -> dict[str, Any]:
        response = self.rest("GET", f"/sandboxes/{sandbox_id}")
        assert response.status_code == 200, response.text
        info: dict[str, Any] = response.json()
        return info

    def ids(self, **params: Any) -> list[str]:
        response = self.rest("GET", "/v2/sandboxes", **params)
        assert response.status_code == 200, response.text
        return [s["sandboxID"] for s in response.json()]

    def envd(
        self, path: str, sandbox_id: str, token: str | None = None, **headers: str
    ) -> httpx.Response:
        sent = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983", **headers}
        if token is not None:
            sent["X-Access-Token"] = token
        return self.http.get(path, headers=sent)


def _team_key(server: LiveServer, *, e2b: bool = True) -> str:
    name = "e2b-" + secrets.token_hex(4)
    assert server.corral("admin", "team", "create", name).returncode == 0
    args = ("admin", "key", "create", "--team", name, *(("--e2b",) if e2b else ()))
    done = server.corral(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def e2b(server: LiveServer) -> Iterator[E2b]:
    """A new team's client on the session's server; its sandboxes are killed afterwards."""
    client = E2b(server, _team_key(server))
    yield client
    for sandbox_id in client.ids(state="running,paused"):
        client.rest("DELETE", f"/sandboxes/{sandbox_id}")
    client.http.close()


@pytest.fixture(scope="module")
def refused(server: LiveServer) -> Iterator[E2b]:
    """A team whose requests are all refused: it never has a sandbox."""
    client = E2b(server, _team_key(server))
    yield client
    try:
        assert client.ids() == []
    finally:
        client.http.close()


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- keys -----------------------------------------------------------------------------------


def test_e2b_keys_have_e2bs_shape_and_work_as_corral_keys(store: Store) -> None:
    store.create_team("acme")
    key = store.create_api_key("acme", e2b=True)
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", key)  # what the e2b SDK's key check accepts
    assert store.authenticate(key).name == "acme"
    store.revoke_api_key(key[:12])
    with pytest.raises(Unauthenticated):
        store.authenticate(key)


def test_rest_needs_a_valid_key_and_says_how_to_get_one(server: LiveServer) -> None:
    key = _team_key(server)  # `corral admin key create --e2b`
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", key)
    for headers in ({}, {"X-API-KEY": "e2b_" + "0" * 40}, {"X-API-KEY": key[:-1]}):
        response = httpx.get(server.url + "/v2/sandboxes", headers=headers)
        assert response.status_code == 401
        body = response.json()
        assert (
            body["code"] == 401 and "corral admin key create --team TEAM --e2b" in body["message"]
        )
    # The key works as E2B sends it, as a Bearer key, and on Corral's own API.
    for headers in ({"X-API-KEY": key}, {"Authorization": f"Bearer {key}"}):
        assert httpx.get(server.url + "/v2/sandboxes", headers=headers).json() == []
    assert call(server, "List", {}, key=key).status_code == 200


def test_unknown_routes_and_methods_are_refused_in_e2bs_shape(refused: E2b) -> None:
    response = refused.rest("GET", "/sandboxes/x/nothing-here")
    assert response.status_code == 404 and response.json()["code"] == 404
    response = refused.rest("PUT", "/v2/sandboxes")
    assert response.status_code == 405 and "GET" in response.json()["message"]


# -- create, get, kill ---------------------------------------------------------------------------


def test_create_get_and_kill(e2b: E2b) -> None:
    before = time.time()
    created = e2b.create(
        timeout=120, metadata={"who": "me"}, envVars={"GREETING": "hi"}, secure=True
    )
    sandbox_id, token = created["sandboxID"], created["envdAccessToken"]
    assert created["templateID"] == "host" and created["alias"] == "host"
    assert created["clientID"] and created["domain"] is None
    assert tuple(map(int, created["envdVersion"].split("."))) >= (0, 6, 4)

    info = e2b.info(sandbox_id)
    assert info["sandboxID"] == sandbox_id and info["state"] == "running"
    assert info["metadata"] == {"who": "me"} and info["envdAccessToken"] == token
    assert info["cpuCount"] >= 1 and info["memoryMB"] > 0 and info["diskSizeMB"] > 0
    assert info["lifecycle"] == {"autoResume": False, "onTimeout": "kill"}
    started, end = _at(info["startedAt"]), _at(info["endAt"])
    assert started.timestamp() >= before - 1
    assert abs((end - started).total_seconds() - 120) < 2
    assert e2b.envd("/envs", sandbox_id, token).json() == {"GREETING": "hi"}

    assert e2b.rest("DELETE", f"/sandboxes/{sandbox_id}").status_code == 204
    for method, path in (("DELETE", ""), ("GET", ""), ("POST", "/pause")):
        response = e2b.rest(method, f"/sandboxes/{sandbox_id}{path}")
        assert response.status_code == 404, (method, path, response.text)
    assert sandbox_id not in e2b.ids()
    assert e2b.envd("/health", sandbox_id, token).status_code == 502


def test_v1_create_and_the_e2b_defaults(e2b: E2b) -> None:
    response = e2b.rest("POST", "/sandboxes", {"templateID": "host"})
    assert response.status_code == 201, response.text
    created = response.json()
    # No `secure`: E2B's API default, reached by its id (no token); the SDK sends true.
    assert "envdAccessToken" not in created
    assert e2b.envd("/health", created["sandboxID"]).status_code == 204
    info = e2b.info(created["sandboxID"])
    assert abs((_at(info["endAt"]) - _at(info["startedAt"])).total_seconds() - 300) < 2


def test_base_is_the_default_template(e2b: E2b) -> None:
    # A create that names no template gets E2B's default, `base`. The session's server
    # has it where this host can make it (tests/kit/e2b_base.py: the tiers without the
    # `host` template start from it); elsewhere the create is refused naming it, and
    # creates nothing.
    response = e2b.rest("POST", "/v2/sandboxes", {"timeout": 60})
    if base_unavailable() is not None:
        assert response.status_code == 404 and "'base'" in response.json()["message"]
        assert e2b.ids() == []
        return
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["templateID"] == "base"
    assert e2b.ids() == [created["sandboxID"]]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"templateID": "no-such-template"}, 404, "no-such-template"),
        ({"templateID": ""}, 400, "templateID"),
        ({"timeout": "soon"}, 400, "timeout"),
        ({"timeout": 100 * 24 * 3600}, 400, "timeout"),
        ({"metadata": {"n": 1}}, 400, "metadata"),
        ({"metadata": "x"}, 400, "metadata"),
        ({"envVars": {"A": 1}}, 400, "envVars"),
        ({"autoPause": "yes"}, 400, "autoPause"),
        ({"secure": 1}, 400, "secure"),
        ({"autoResume": {"enabled": True}}, 400, "connect"),
        ({"volumeMounts": {"name": "v"}}, 400, "volumeMounts"),
    ],
)
def test_create_refuses_bad_bodies_and_creates_nothing(
    refused: E2b, body: dict[str, Any], status: int, words: str
) -> None:
    response = refused.rest("POST", "/v2/sandboxes", {"templateID": "host", **body})
    assert response.status_code == status, response.text
    assert response.json()["code"] == status and words in response.json()["message"]
    assert refused.ids() == []


def test_a_body_that_is_not_json_is_refused(refused: E2b) -> None:
    headers = {"X-API-KEY": refused.key}
    response = refused.http.post("/v2/sandboxes", content=b"{nope", headers=headers)
    assert response.status_code == 400 and "JSON" in response.json()["message"]
    response = refused.http.post("/v2/sandboxes", content=b"[1]", headers=headers)
    assert response.status_code == 400 and "JSON object" in response.json()["message"]
    assert refused.ids() == []


# -- list --------------------------------------------------------------------------------------


def test_list_filters_orders_and_pages(e2b: E2b) -> None:
    tag = "odd key & = %"  # the SDK quotes keys and values, then urlencodes them
    ids = []
    for n in range(3):
        ids.append(e2b.create(metadata={tag: f"v {n}&x", "n": str(n)})["sandboxID"])
        time.sleep(0.01)  # distinct start times
    infos = {i: e2b.info(i) for i in ids}

    assert e2b.ids() == ids[::-1]  # newest first by default
    assert e2b.ids(order="asc") == ids
    metadata = urlencode({quote(tag): quote("v 1&x")})
    assert e2b.ids(metadata=metadata) == [ids[1]]
    both = urlencode({quote(tag): quote("v 1&x"), "n": "2"})
    assert e2b.ids(metadata=both) == []  # every pair must match
    assert e2b.ids(startedAfter=infos[ids[1]]["startedAt"], order="asc") == ids[1:]
    assert e2b.ids(template="host") == ids[::-1]
    assert e2b.ids(template="other") == []

    # Pages of one, across the whole list, with the token in x-next-token.
    seen, token = [], None
    while True:
        params: dict[str, Any] = {"limit": 1}
        if token:
            params["nextToken"] = token
        response = e2b.rest("GET", "/v2/sandboxes", **params)
        assert response.status_code == 200
        seen += [s["sandboxID"] for s in response.json()]
        token = response.headers.get("x-next-token")
        if not token:
            break
    assert seen == ids[::-1]

    # Paused ones are listed as paused; killed ones are gone.
    assert e2b.rest("POST", f"/sandboxes/{ids[0]}/pause").status_code == 204
    assert e2b.ids(state="paused") == [ids[0]]
    assert e2b.ids(state="running") == [ids[2], ids[1]]
    listed = {s["sandboxID"]: s for s in e2b.rest("GET", "/v2/sandboxes").json()}
    assert listed[ids[0]]["state"] == "paused"
    assert set(listed[ids[1]]) >= {
        "templateID", "sandboxID", "clientID", "startedAt", "endAt", "cpuCount",
        "memoryMB", "diskSizeMB", "state", "envdVersion", "metadata", "alias",
    }  # fmt: skip
    assert e2b.rest("DELETE", f"/sandboxes/{ids[1]}").status_code == 204
    assert e2b.ids() == [ids[2], ids[0]]
    # The deprecated list: running ones only.
    legacy = e2b.rest("GET", "/sandboxes")
    assert [s["sandboxID"] for s in legacy.json()] == [ids[2]]


@pytest.mark.parametrize(
    "params",
    [
        {"state": "killed"},
        {"state": ","},
        {"order": "up"},
        {"limit": "0"},
        {"limit": "101"},
        {"limit": "ten"},
        {"startedAfter": "yesterday"},
        {"startedAfter": "2026-01-01T00:00:00"},  # no zone
        {"nextToken": "not-a-token"},
        {"metadata": "a=1&&b"},
    ],
)
def test_list_refuses_bad_queries(refused: E2b, params: dict[str, str]) -> None:
    response = refused.rest("GET", "/v2/sandboxes", **params)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 400


# -- timeout, connect, refresh -------------------------------------------------------------------


def test_timeout_moves_the_deadline_and_zero_ends_the_sandbox(e2b: E2b) -> None:
    created = e2b.create(timeout=60)
    sandbox_id = created["sandboxID"]
    before = time.time()
    assert e2b.rest("POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": 600}).status_code == 204
    end = _at(e2b.info(sandbox_id)["endAt"]).timestamp()
    assert before + 599 <= end <= time.time() + 601
    # Shorter is allowed too (it overwrites).
    assert e2b.rest("POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": 30}).status_code == 204
    assert _at(e2b.info(sandbox_id)["endAt"]).timestamp() < end - 500
    for bad in ({}, {"timeout": -1}, {"timeout": "1"}):
        response = e2b.rest("POST", f"/sandboxes/{sandbox_id}/timeout", bad)
        assert response.status_code == 400, response.text
    assert e2b.rest("POST", f"/sandboxes/{sandbox_id}/timeout", {"timeout": 0}).status_code == 204
    wait_until(
        lambda: e2b.rest("GET", f"/sandboxes/{sandbox_id}").status_code == 404,
        "the sandbox to end at its deadline",
    )
    assert e2b.envd("/health", sandbox_id).status_code == 502
    missing = e2b.rest("POST", "/sandboxes/nope/timeout", {"timeout": 5})
    assert missing.status_code == 404


def test_connect_only_extends_and_returns_the_same_token(e2b: E2b) -> None:
    created = e2b.create(timeout=300, secure=True)
    sandbox_id = created["sandboxID"]
    end = e2b.info(sandbox_id)["endAt"]
    for path in (f"/sandboxes/{sandbox_id}/connect", f"/v2/sandboxes/{sandbox_id}/connect"):
        response = e2b.rest("POST", path, {"timeout": 10})
        assert response.status_code == 200, response.text
        assert response.json()["envdAccessToken"] == created["envdAccessToken"]
        assert response.json()["sandboxID"] == sandbox_id
        assert e2b.info(sandbox_id)["endAt"] == end  # exactly unchanged
    response = e2b.rest("POST", f"/sandboxes/{sandbox_id}/connect", {"timeout": 900})
    assert response.status_code == 200
    assert _at(e2b.info(sandbox_id)["endAt"]) > _at(end) + timedelta(seconds=500)
    # A refresh extends the same way (never shortens).
    extended = e2b.info(sandbox_id)["endAt"]
    refresh = e2b.rest("POST", f"/sandboxes/{sandbox_id}/refreshes", {"duration": 5})
    assert refresh.status_code == 204 and e2b.info(sandbox_id)["endAt"] == extended
    assert e2b.rest("POST", "/sandboxes/nope/connect", {"timeout": 10}).status_code == 404


# -- pause, resume, auto-pause -------------------------------------------------------------------


def test_pause_then_connect_resumes(e2b: E2b) -> None:
    created = e2b.create(secure=True)
    sandbox_id, token = created["sandboxID"], created["envdAccessToken"]
    assert e2b.rest("POST", f"/sandboxes/{sandbox_id}/pause", {"memory": True}).status_code == 204
    again = e2b.rest("POST", f"/sandboxes/{sandbox_id}/pause")
    assert again.status_code == 409 and again.json()["code"] == 409
    assert e2b.info(sandbox_id)["state"] == "paused"
    unreachable = e2b.envd("/health", sandbox_id, token)
    assert unreachable.status_code == 502 and "not running" in unreachable.json()["message"]

    response = e2b.rest("POST", f"/sandboxes/{sandbox_id}/connect", {"timeout": 120})
    assert response.status_code == 201, response.text
    assert response.json()["envdAccessToken"] == token
    info = e2b.info(sandbox_id)
    assert info["state"] == "running"
    assert abs(_at(info["endAt"]).timestamp() - time.time() - 120) < 5
    assert e2b.envd("/health", sandbox_id, token).status_code == 204

    # The deprecated resume: 409 on a running sandbox, 201 on a paused one.
    assert e2b.rest("POST", f"/sandboxes/{sandbox_id}/resume", {}).status_code == 409
    assert e2b.rest("POST", f"/sandboxes/{sandbox_id}/pause").status_code == 204
    resumed = e2b.rest("POST", f"/sandboxes/{sandbox_id}/resume", {"timeout": 60})
    assert resumed.status_code == 201 and e2b.info(sandbox_id)["state"] == "running"


def test_concurrent_pauses_and_connects_agree(e2b: E2b) -> None:
    sandbox_id = e2b.create()["sandboxID"]
    with ThreadPoolExecutor(2) as pool:
        pauses = pool.map(lambda _: e2b.rest("POST", f"/sandboxes/{sandbox_id}/pause"), [1, 2])
        assert sorted(r.status_code for r in pauses) == [204, 409]
        body = {"timeout": 60}
        connects = pool.map(
            lambda _: e2b.rest("POST", f"/sandboxes/{sandbox_id}/connect", body), [1, 2]
        )
        assert sorted(r.status_code for r in connects) == [200, 201]
    assert e2b.info(sandbox_id)["state"] == "running"


def test_auto_pause_pauses_at_the_deadline_and_keeps_it_paused(e2b: E2b) -> None:
    created = e2b.create(timeout=1, autoPause=True)
    sandbox_id = created["sandboxID"]
    assert e2b.info(sandbox_id)["lifecycle"]["onTimeout"] == "pause"
    wait_until(lambda: e2b.info(sandbox_id)["state"] == "paused", "the deadline to pause it")
    time.sleep(1.5)  # past its deadline, paused: the timer must not kill it now
    assert e2b.info(sandbox_id)["state"] == "paused"
    response = e2b.rest("POST", f"/sandboxes/{sandbox_id}/connect", {"timeout": 60})
    assert response.status_code == 201
    assert e2b.info(sandbox_id)["state"] == "running"


# -- teams and envd credentials ----------------------------------------------------------------


def test_teams_never_see_each_others_sandboxes(server: LiveServer, e2b: E2b) -> None:
    created = e2b.create(secure=True)
    sandbox_id, token = created["sandboxID"], created["envdAccessToken"]
    other = E2b(server, _team_key(server))
    try:
        for method, path, body in (
            ("GET", "", None),
            ("DELETE", "", None),
            ("POST", "/timeout", {"timeout": 1}),
            ("POST", "/pause", None),
            ("POST", "/connect", {"timeout": 10}),
            ("POST", "/resume", {"timeout": 10}),
            ("POST", "/refreshes", {"duration": 10}),
        ):
            response = other.rest(method, f"/sandboxes/{sandbox_id}{path}", body)
            assert response.status_code == 404, (method, path, response.text)
        assert other.ids() == []
        # envd: another team's key is refused even with the right token.
        response = other.envd("/health", sandbox_id, token, **{"X-API-KEY": other.key})
        assert response.status_code == 404
    finally:
        other.http.close()
    info = e2b.info(sandbox_id)
    assert info["state"] == "running" and _at(info["endAt"]).timestamp() > time.time() + 60


def test_envd_needs_the_access_token_of_a_secure_sandbox(e2b: E2b) -> None:
    secure = e2b.create(secure=True)
    open_one = e2b.create(secure=False)
    sandbox_id, token = secure["sandboxID"], secure["envdAccessToken"]
    for sent in (None, "", "wrong", open_one.get("envdAccessToken", "x"), token[:-1]):
        response = e2b.envd("/health", sandbox_id, sent)
        assert response.status_code == 401, sent
        assert "X-Access-Token" in response.json()["message"]
    # The team's key does not replace the token.
    assert e2b.envd("/health", sandbox_id, **{"X-API-KEY": e2b.key}).status_code == 401
    assert e2b.envd("/health", sandbox_id, token).status_code == 204
    # A sandbox created with secure=false is reached by its id, as on E2B.
    assert e2b.envd("/health", open_one["sandboxID"]).status_code == 204
    # Another secure sandbox's token opens only that one.
    assert secure["envdAccessToken"] != e2b.create(secure=True)["envdAccessToken"]


def test_envd_reaches_a_corral_sandbox_only_with_its_teams_key(
    server: LiveServer, e2b: E2b
) -> None:
    response = call(server, "Create", {"timeoutSeconds": 120}, key=e2b.key)
    assert response.status_code == 200, response.text
    sandbox_id = response.json()["sandbox"]["id"]
    refused = e2b.envd("/health", sandbox_id)
    assert refused.status_code == 401 and "X-API-KEY" in refused.json()["message"]
    assert e2b.envd("/health", sandbox_id, **{"X-API-KEY": e2b.key}).status_code == 204
    assert e2b.envd("/health", sandbox_id, **{"X-API-KEY": server.key}).status_code == 404
    assert sandbox_id in e2b.ids()  # E2B's list shows the team's Corral sandboxes too


def test_envd_by_e2bs_host_form(e2b: E2b) -> None:
    """`49983-<id>.<ports domain>` (where E2B_DOMAIN sends the SDK) is envd, not a
    sandbox port to proxy, with the same checks as the header form."""
    created = e2b.create(secure=True, envVars={"WHERE": "host form"})
    sandbox_id, token = created["sandboxID"], created["envdAccessToken"]
    port = e2b.server.url.rsplit(":", 1)[1]

    def get(path: str, name: str, **headers: str) -> httpx.Response:
        return e2b.http.get(path, headers={"Host": f"49983-{name}.localhost:{port}", **headers})

    assert get("/health", sandbox_id, **{"X-Access-Token": token}).status_code == 204
    assert get("/envs", sandbox_id, **{"X-Access-Token": token}).json() == {"WHERE": "host form"}
    assert get("/health", sandbox_id).status_code == 401
    assert get("/health", "sbx_unknown").status_code == 502


def test_envd_refusals(e2b: E2b) -> None:
    sandbox_id = e2b.create()["sandboxID"]
    unknown = e2b.envd("/health", "sbx_unknown")
    assert unknown.status_code == 502 and unknown.json()["code"] == 502
    no_id = e2b.http.get("/health")
    assert no_id.status_code == 400 and "E2b-Sandbox-Id" in no_id.json()["message"]
    bad_user = e2b.envd("/health", sandbox_id, Authorization="Bearer x")
    assert bad_user.status_code == 400 and "Basic" in bad_user.json()["message"]
    not_base64 = e2b.envd("/health", sandbox_id, Authorization="Basic !!!")
    assert not_base64.status_code == 400
    assert e2b.envd("/health", sandbox_id, Authorization="Basic dXNlcjo=").status_code == 204
    assert e2b.envd("/nothing", sandbox_id).status_code == 404
