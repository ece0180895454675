"""E2B's snapshots, forks, template aliases and builds, metrics and network options, on the
wire (httpx against a real `corral server`, its sandboxes real, on a Debian template of
the local archive). The official SDK's view of the same routes is in tests/e2b_sdk.

Sandboxes are made with Corral's own SDK where the route under test is not E2B's create,
so each test needs only the routes it is about."""

from __future__ import annotations

import io
import secrets
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral import Sandbox
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.network.policy import NetworkPolicy
from corral.server.e2b.network import network_body, network_policy
from tests.conftest import (
    DATABASES,
    LiveServer,
    database_url,
    opts,
    require_backend,
    start_server,
)
from tests.kit import e2b_base
from tests.kit.debian import needs_archive
from tests.kit.polling import wait_until
from tests.test_template_server import add_template

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]
# The server's `base` (E2B's default template) needs more of the local archive.
BASE = e2b_base.needs_base()

TEMPLATE = "deb"


@pytest.fixture(scope="module", params=DATABASES)
def eserver(settings: Settings, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A server whose default team has the template `deb` (Debian with python3), and
    whose sandboxes reach no network; on SQLite, and on PostgreSQL (snapshots, aliases and
    builds are the store's)."""
    require_backend(settings, "namespace")
    data = settings.runtime_dir / f"e2b-more-{secrets.token_hex(4)}"
    url = database_url(request)
    env = {"CORRAL_DATABASE_URL": url}
    start_server(settings, data, pool_size=0, extra_env=env).stop()  # its store and team
    add_template(settings.with_(data_dir=data, database_url=url), TEMPLATE)
    if not any(mark.args[0] for mark in BASE):
        e2b_base.install(data)  # the server's `base`, every team's
    # No uplinks in the host's namespace: sandboxes and builds get no network here (the
    # network options are proven in the fake internet, below).
    env["CORRAL_NETWORK_MODES"] = "none"
    live = start_server(settings, data, pool_size=0, extra_env=env)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def other_key(eserver: LiveServer) -> str:
    return eserver.new_team(f"other-{secrets.token_hex(3)}")


@pytest.fixture
def api(eserver: LiveServer) -> Iterator[httpx.Client]:
    """E2B's REST API as the default team."""
    headers = {"X-API-KEY": eserver.key}
    with httpx.Client(base_url=eserver.url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture
def other(eserver: LiveServer, other_key: str) -> Iterator[httpx.Client]:
    """E2B's REST API as another team."""
    headers = {"X-API-KEY": other_key}
    with httpx.Client(base_url=eserver.url, headers=headers, timeout=120) as client:
        yield client


def refused(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and words in body["message"], body


def run(sbx: Sandbox, script: str) -> str:
    ran = sbx.commands.run(script)
    assert ran.exit_code == 0, ran.stderr
    return ran.stdout


# -- snapshots ------------------------------------------------------------------------------


def test_snapshots_boot_independent_sandboxes_list_by_source_and_name_and_delete(
    eserver: LiveServer, api: httpx.Client, other: httpx.Client
) -> None:
    with Sandbox.create(TEMPLATE, timeout=300, **opts(eserver)) as sbx:
        run(sbx, "echo original > /opt/state.txt")
        made = api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={"name": "snap-one"})
        assert made.status_code == 201, made.text
        assert made.json() == {"snapshotID": "snap-one", "names": ["snap-one"]}
        unnamed = api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={})
        assert unnamed.status_code == 201, unnamed.text
        second = unnamed.json()["snapshotID"]
        assert second.startswith("snapshot-") and unnamed.json()["names"] == [second]

        # Bad input changes nothing; another team sees neither the sandbox nor them.
        bad = api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={"name": "Bad Name!"})
        refused(bad, 400, "invalid")
        refused(api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={"name": 3}), 400, "string")
        refused(other.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={}), 404, "no sandbox")
        for taken in (TEMPLATE, "base"):  # a snapshot never replaces a template
            again = api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={"name": taken})
            refused(again, 409, "names a template")
        assert other.get("/snapshots").json() == []

        listed = api.get("/snapshots", params={"sandboxID": sbx.sandbox_id})
        assert listed.status_code == 200, listed.text
        assert [s["snapshotID"] for s in listed.json()] == [second, "snap-one"]  # newest first
        for name in ("snap-one", "team/snap-one:default"):
            assert api.get("/snapshots", params={"name": name}).json() == [made.json()]
        assert api.get("/snapshots", params={"name": "snap-none"}).json() == []
        assert api.get("/snapshots", params={"sandboxID": "sbx-unknown"}).json() == []
        page = api.get("/snapshots", params={"sandboxID": sbx.sandbox_id, "limit": 1})
        assert len(page.json()) == 1 and page.headers["x-next-token"]
        rest_page = api.get(
            "/snapshots",
            params={"sandboxID": sbx.sandbox_id, "limit": 1,
                    "nextToken": page.headers["x-next-token"]},
        )  # fmt: skip
        assert [s["snapshotID"] for s in rest_page.json()] == ["snap-one"]
        assert "x-next-token" not in rest_page.headers
        refused(api.get("/snapshots", params={"limit": 0}), 400, "limit")
        refused(api.get("/snapshots", params={"nextToken": "abc"}), 400, "nextToken")

        run(sbx, "echo changed-after > /opt/state.txt")  # the snapshot keeps what was

    # Siblings from one snapshot see its files and never each other's writes.
    with (
        Sandbox.create("snap-one", timeout=120, **opts(eserver)) as one,
        Sandbox.create("snap-one", timeout=120, **opts(eserver)) as two,
    ):
        assert run(one, "cat /opt/state.txt") == "original\n"
        run(one, "echo mine > /opt/state.txt")
        assert run(two, "cat /opt/state.txt") == "original\n"
        refused(api.delete("/templates/snap-one"), 409, "kill them first")
    refused(other.delete("/templates/snap-one"), 404, "no template")
    assert api.delete("/templates/snap-one").status_code == 204
    refused(api.delete("/templates/snap-one"), 404, "no template")
    assert api.delete(f"/templates/{second}").status_code == 204
    assert api.get("/snapshots").json() == []
    # A sandbox that is gone cannot be snapshotted.
    refused(api.post(f"/sandboxes/{sbx.sandbox_id}/snapshots", json={}), 404, "no sandbox")


# -- fork -------------------------------------------------------------------------------------


def test_fork_copies_the_filesystem_and_settings_into_independent_sandboxes(
    eserver: LiveServer, api: httpx.Client, other: httpx.Client
) -> None:
    create = {"templateID": TEMPLATE, "timeout": 120, "metadata": {"k": "v"},
              "envVars": {"FROM_CREATE": "yes"}, "secure": True}  # fmt: skip
    made = api.post("/sandboxes", json=create)
    assert made.status_code == 201, made.text
    source_id = made.json()["sandboxID"]
    forks: list[str] = []
    try:
        with Sandbox.connect(source_id, **opts(eserver)) as source:
            run(source, "echo before > /opt/state.txt")
            refused(api.post(f"/sandboxes/{source_id}/fork", json={"count": 0}), 400, "count")
            refused(api.post(f"/sandboxes/{source_id}/fork", json={"count": 17}), 400, "count")
            refused(other.post(f"/sandboxes/{source_id}/fork", json={}), 404, "no sandbox")
            forked = api.post(f"/sandboxes/{source_id}/fork", json={"count": 2, "timeout": 60})
            assert forked.status_code == 201, forked.text
            entries = forked.json()
            assert len(entries) == 2 and all("sandbox" in e for e in entries), entries
            forks = [e["sandbox"]["sandboxID"] for e in entries]
            assert len({source_id, *forks}) == 3
            assert all(e["sandbox"]["envdAccessToken"] for e in entries)  # secure as the source
            for fork_id in forks:
                assert api.get(f"/sandboxes/{fork_id}").json()["metadata"] == {"k": "v"}
                with Sandbox.connect(fork_id, **opts(eserver)) as fork:
                    assert run(fork, "cat /opt/state.txt; echo $FROM_CREATE") == "before\nyes\n"
                    run(fork, "echo mine > /opt/state.txt")
            assert run(source, "cat /opt/state.txt") == "before\n"
        # The fork's template was only a means: nothing of it is listed.
        assert api.get("/snapshots").json() == []
        assert not [t for t in api.get("/templates").json() if t["templateID"].startswith("fork")]
    finally:
        for sandbox_id in (source_id, *forks):
            api.delete(f"/sandboxes/{sandbox_id}")
    refused(api.post(f"/sandboxes/{source_id}/fork", json={}), 404, "")


# -- metrics --------------------------------------------------------------------------------


def test_metrics_cover_the_sandbox_and_a_range_before_it_is_empty(
    eserver: LiveServer, api: httpx.Client, other: httpx.Client
) -> None:
    started = int(time.time())
    with Sandbox.create(TEMPLATE, timeout=120, **opts(eserver)) as sbx:
        path = f"/sandboxes/{sbx.sandbox_id}/metrics"
        found: list[dict[str, Any]] = []

        def sampled() -> bool:
            response = api.get(path)
            assert response.status_code == 200, response.text
            found[:] = response.json()
            return bool(found)

        wait_until(sampled, "a first metrics sample", timeout=30)
        point = found[0]
        assert point["cpuCount"] == 1 and point["memTotal"] == 512 * 1024 * 1024
        assert point["diskTotal"] == 1024 * 1024 * 1024 and point["memUsed"] > 0
        assert 0 <= point["cpuUsedPct"] <= 100 and point["timestamp"].endswith("Z")
        assert point["timestampUnix"] >= started - 1
        now = int(time.time())
        ranged = api.get(path, params={"start": started, "end": now}).json()
        assert ranged and all(started <= p["timestampUnix"] <= now for p in ranged)
        before = api.get(path, params={"start": started - 3600, "end": started - 1800})
        assert before.status_code == 200 and before.json() == []
        refused(api.get(path, params={"start": now, "end": now - 10}), 400, "after end")
        refused(api.get(path, params={"start": "yesterday"}), 400, "Unix time")
        refused(other.get(path), 404, "no sandbox")
    refused(api.get("/sandboxes/sbx-unknown/metrics"), 404, "no sandbox")


# -- templates: aliases, listing, builds -------------------------------------------------------


def test_aliases_name_the_teams_templates_only(api: httpx.Client, other: httpx.Client) -> None:
    found = api.get(f"/templates/aliases/{TEMPLATE}")
    assert found.status_code == 200, found.text
    assert found.json() == {"templateID": TEMPLATE, "public": False}
    refused(api.get("/templates/aliases/nothing-here"), 404, "no template")
    refused(other.get(f"/templates/aliases/{TEMPLATE}"), 404, "no template")
    listed = api.get("/templates")
    assert listed.status_code == 200
    mine = next(t for t in listed.json() if t["templateID"] == TEMPLATE)
    assert mine["buildStatus"] == "ready" and mine["names"] == [TEMPLATE]
    assert other.get("/templates").json() == []


@pytest.mark.parametrize("name", [pytest.param("base", marks=BASE)])
def test_the_servers_base_is_every_teams_public_alias(
    name: str, api: httpx.Client, other: httpx.Client
) -> None:
    for client in (api, other):
        assert client.get(f"/templates/aliases/{name}").json() == {
            "templateID": name,
            "public": True,
        }


def _wait_build(api: httpx.Client, name: str, build_id: str) -> tuple[dict[str, Any], str]:
    """The final status of the build and every log line it gave, read as the SDK does
    (logsOffset advanced by the entries of each answer)."""
    offset, lines, status = 0, [], {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        response = api.get(
            f"/templates/{name}/builds/{build_id}/status", params={"logsOffset": offset}
        )
        assert response.status_code == 200, response.text
        status = response.json()
        offset += len(status["logEntries"])
        lines += [entry["message"] for entry in status["logEntries"]]
        if status["status"] in ("ready", "error") and not status["logEntries"]:
            return status, "".join(lines)
        time.sleep(0.3)
    raise AssertionError(f"build {name} did not finish: {status}")


def test_builder_calls_build_a_template_from_another_with_logs(
    eserver: LiveServer, api: httpx.Client
) -> None:
    asked = api.post("/v3/templates", json={"name": "built:v1", "cpuCount": 1, "memoryMB": 256})
    assert asked.status_code == 202, asked.text
    ids = asked.json()
    assert ids["templateID"] == "built" and ids["buildID"] and ids["names"] == ["built"]
    template = {
        "fromTemplate": TEMPLATE,
        "steps": [
            {"type": "RUN", "args": ["echo built-by-e2b > /opt/built.txt; echo step-says-hi"]},
            {"type": "ENV", "args": ["GREETING", "hello"]},
        ],
        "force": False,
    }
    started = api.post(f"/v2/templates/built/builds/{ids['buildID']}", json=template)
    assert started.status_code == 202, started.text
    status, logs = _wait_build(api, "built", ids["buildID"])
    assert status["status"] == "ready", status
    assert "step-says-hi" in logs
    with Sandbox.create("built", timeout=120, **opts(eserver)) as sbx:
        assert run(sbx, "cat /opt/built.txt; echo $GREETING") == "built-by-e2b\nhello\n"

    # A failing step: error, with the reason the SDK raises.
    failing = {"fromTemplate": TEMPLATE, "steps": [{"type": "RUN", "args": ["echo boom; exit 3"]}]}
    assert api.post("/v2/templates/broken/builds/b1", json=failing).status_code == 202
    status, logs = _wait_build(api, "broken", "b1")
    assert status["status"] == "error" and status["reason"]["message"], status
    assert "boom" in logs

    # Refused before anything is made.
    copy = {"fromTemplate": TEMPLATE, "steps": [{"type": "COPY", "args": ["a", "/a"]}]}
    refused(api.post("/v2/templates/copied/builds/b2", json=copy), 400, "filesHash")
    copy["steps"][0]["filesHash"] = "f" * 64  # type: ignore[index]
    refused(api.post("/v2/templates/copied/builds/b2", json=copy), 400, "were not uploaded")
    refused(api.post("/v2/templates/nobase/builds/b3", json={"steps": []}), 400, "no base")
    refused(api.post("/v3/templates", json={"name": "Not Valid!"}), 400, "invalid")
    refused(api.post("/v3/templates", json={}), 400, "name the template")
    refused(api.get("/templates/copied/builds/b2/status"), 404, "no template")
    names = {t["templateID"] for t in api.get("/templates").json()}
    assert "copied" not in names and "nobase" not in names


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_copy_steps_build_from_files_uploaded_to_one_use_links(
    eserver: LiveServer, api: httpx.Client
) -> None:
    files_hash = secrets.token_hex(32)
    link = api.get(f"/templates/copier/files/{files_hash}")
    assert link.status_code == 201, link.text
    assert link.json()["present"] is False
    url = link.json()["url"]
    assert url.startswith(eserver.url + "/templates/copier/files/")
    upload = _tar({"app/hello.txt": b"copied\n", "app/sub/more.txt": b"more\n"})
    with httpx.Client() as anonymous:  # the link is the credential, as the SDK uses it
        assert anonymous.put(url, content=upload).status_code == 200
        refused(anonymous.put(url, content=upload), 403, "not valid")  # one use
        forged = url.rpartition("uploadToken=")[0] + "uploadToken=guess"
        refused(anonymous.put(forged, content=upload), 403, "not valid")
    assert api.get(f"/templates/copier/files/{files_hash}").json()["present"] is True
    refused(api.get("/templates/copier/files/not-hex"), 400, "hex digest")
    template = {
        "fromTemplate": TEMPLATE,
        "steps": [
            {"type": "COPY", "args": ["app/hello.txt", "/opt/hello.txt"], "filesHash": files_hash},
            {"type": "COPY", "args": ["app/sub", "/opt/sub"], "filesHash": files_hash},
        ],
    }
    assert api.post("/v2/templates/copier/builds/c1", json=template).status_code == 202
    status, _ = _wait_build(api, "copier", "c1")
    assert status["status"] == "ready", status
    with Sandbox.create("copier", timeout=120, **opts(eserver)) as sbx:
        assert run(sbx, "cat /opt/hello.txt /opt/sub/more.txt") == "copied\nmore\n"

    # An upload that climbs out of its context is refused before anything runs.
    evil_hash = secrets.token_hex(32)
    evil = api.get(f"/templates/evil/files/{evil_hash}").json()["url"]
    with httpx.Client() as anonymous:
        assert anonymous.put(evil, content=_tar({"../../etc/x": b"x"})).status_code == 200
    step = {"type": "COPY", "args": ["etc", "/opt/x"], "filesHash": evil_hash}
    bad = api.post("/v2/templates/evil/builds/e1", json={"fromTemplate": TEMPLATE, "steps": [step]})
    refused(bad, 400, "build context")
    assert "evil" not in {t["templateID"] for t in api.get("/templates").json()}


def test_uploads_waiting_for_builds_are_bounded_per_team(
    eserver: LiveServer, other: httpx.Client
) -> None:
    from corral.server.e2b.uploads import MAX_UPLOADS

    small = _tar({"f.txt": b"x"})
    with httpx.Client() as anonymous:
        for _ in range(MAX_UPLOADS):
            url = other.get(f"/templates/filler/files/{secrets.token_hex(32)}").json()["url"]
            assert anonymous.put(url, content=small).status_code == 200
        one_more = other.get(f"/templates/filler/files/{secrets.token_hex(32)}")
        refused(one_more, 429, "wait for a build")
        # An upload's team is only what its URL says: an unknown one makes nothing.
        forged = f"{eserver.url}/templates/x/files/{'a' * 64}?team=nobody&uploadToken=t"
        refused(anonymous.put(forged, content=small), 403, "not valid")
    assert not (eserver.data_dir / "e2b-uploads" / "nobody").exists()


# -- network options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "mode", "entries"),
    [
        ({}, "internet", ()),
        ({"allow_internet_access": True}, "internet", ()),
        ({"allow_internet_access": False}, "none", ()),
        ({"network": {"denyOut": ["0.0.0.0/0"]}}, "none", ()),
        (
            {"network": {"denyOut": ["0.0.0.0/0"], "allowOut": ["192.0.2.10", "pypi.org"]}},
            "allowlist",
            ("192.0.2.10/32", "pypi.org"),
        ),
        ({"allow_internet_access": False, "network": {"allowOut": ["1.1.1.1"]}},
         "allowlist", ("1.1.1.1/32",)),
        ({"network": {"denyOut": ["10.0.0.0/8"]}}, "internet", ()),  # always denied anyway
        ({"network": {"allowOut": ["10.99.0.0/24"]}}, "internet", ("10.99.0.0/24",)),
    ],
)  # fmt: skip
def test_e2b_network_options_map_onto_a_policy(
    body: dict[str, Any], mode: str, entries: tuple[str, ...]
) -> None:
    policy = network_policy(body)
    assert (policy.mode, policy.entries) == (mode, entries)
    # And back: a fork asks for what its source has.
    assert network_policy(network_body(policy, True)) == policy


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"network": {"denyOut": ["8.8.8.8"]}}, "cannot deny one public range"),
        ({"network": {"denyOut": ["example.com"]}}, "is a name"),
        ({"network": {"maskRequestHost": "x.test"}}, "maskRequestHost is not supported"),
        ({"network": {"rules": {"a.test": []}}}, "rules is not supported"),
        ({"network": {"allowOut": "1.1.1.1"}}, "list of strings"),
        ({"allow_internet_access": "no"}, "true or false"),
        ({"network": {"allowPublicTraffic": "yes"}}, None),
    ],
)
def test_e2b_network_options_corral_cannot_honour_are_refused(
    body: dict[str, Any], words: str | None
) -> None:
    from corral.server.e2b.network import public_traffic

    with pytest.raises(InvalidRequest) as caught:
        network_policy(body)
        public_traffic(body)
    if words:
        assert words in str(caught.value)


def test_a_body_that_asks_nothing_narrower_gets_the_template_or_server_default() -> None:
    from corral.server.e2b.network import create_policy
    from corral.templates.defaults import SandboxDefaults

    plain = SandboxDefaults()
    allowlisted = SandboxDefaults(network=NetworkPolicy.parse("allowlist", ["pypi.org"]))
    for body in ({}, {"allow_internet_access": True}, {"network": {"allowPublicTraffic": False}}):
        assert create_policy(body, plain, "none").mode == "none"
        assert create_policy(body, plain, "internet").mode == "internet"
        assert create_policy(body, allowlisted, "internet") == allowlisted.network
    # What a body asks is its policy, for the server's cap to check (and maybe refuse).
    off = {"allow_internet_access": False}
    assert create_policy(off, allowlisted, "internet").mode == "none"
    only = {"network": {"denyOut": ["0.0.0.0/0"], "allowOut": ["192.0.2.10"]}}
    assert create_policy(only, plain, "none").entries == ("192.0.2.10/32",)
    with pytest.raises(InvalidRequest, match="maskRequestHost"):
        create_policy({"network": {"maskRequestHost": "x"}}, plain, "none")


def test_update_network_is_checked_against_the_servers_cap(
    eserver: LiveServer, api: httpx.Client, other: httpx.Client
) -> None:
    with Sandbox.create(TEMPLATE, timeout=120, **opts(eserver)) as sbx:
        path = f"/sandboxes/{sbx.sandbox_id}/network"
        refused(api.put(path, json={}), 403, "internet")  # {}: internet, past the cap
        refused(api.put(path, json={"denyOut": ["8.8.8.8"]}), 400, "cannot deny")
        refused(other.put(path, json={"allow_internet_access": False}), 404, "no sandbox")
        assert sbx.get_info().network.mode == "none"  # unchanged
        assert api.put(path, json={"allow_internet_access": False}).status_code == 204
