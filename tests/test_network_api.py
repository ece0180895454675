"""The network policy through the API: the server's caps, sandboxes' stored and changed
policies, jobs' network fields, and the SDK (real server, on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral.client import AsyncSandbox, Jobs, Limits, Network, Sandbox
from corral.config import Settings
from corral.errors import Forbidden, InvalidRequest, IsolationUnavailable
from corral.isolation import Engine
from corral.jobs.queue import JobQueue
from corral.jobs.runner import Policy
from corral.jobs.spec import JobSpec
from corral.jobs.worker import Worker
from corral.network.policy import NetworkCap, NetworkPolicy, Rule
from corral.sandboxes.options import SandboxRecord, network_json
from corral.server import convert
from corral.store import Store
from corral.store.job_rows import JobRow
from tests.conftest import (
    DATABASES,
    LiveServer,
    database_url,
    new_sandbox_row,
    opts,
    private_runtime,
    start_server,
)
from tests.kit.connect import call, error
from tests.kit.polling import until

# -- the server's cap (pure) -----------------------------------------------------------------


def test_the_default_cap_allows_every_mode_and_public_entries() -> None:
    cap = Settings().network_cap()
    for policy in (
        NetworkPolicy.parse("none"),
        NetworkPolicy.parse("internet"),
        NetworkPolicy.parse("allowlist", ["pypi.org", "*.example.com:443", "203.0.113.0/24"]),
    ):
        cap.check(policy, "acme")


def test_modes_and_internet_teams_are_the_operators_to_give() -> None:
    cap = NetworkCap.parse(modes="allowlist", internet_teams="*")
    cap.check(NetworkPolicy.parse("none"), "acme")  # the tightest is always allowed
    with pytest.raises(Forbidden, match="CORRAL_NETWORK_MODES"):
        cap.check(NetworkPolicy.parse("allow_all"), "acme")
    cap = NetworkCap.parse(internet_teams="ops, research")
    cap.check(NetworkPolicy.parse("internet"), "ops")
    with pytest.raises(Forbidden) as caught:
        cap.check(NetworkPolicy.parse("internet"), "acme")
    assert "'acme'" in str(caught.value) and "CORRAL_NETWORK_INTERNET_TEAMS" in str(caught.value)
    cap.check(NetworkPolicy.parse("allowlist", ["pypi.org"]), "acme")


@pytest.mark.parametrize(
    "entry", ["10.0.0.0/8", "10.99.0.10", "169.254.169.254", "0.0.0.0/0", "[fd00::/8]",
              "::ffff:10.0.0.1", "[fe80::1]:22", "127.0.0.1:8080"],
)  # fmt: skip
def test_always_denied_ranges_need_the_operators_private_allow(entry: str) -> None:
    policy = NetworkPolicy.parse("allowlist", [entry])
    with pytest.raises(Forbidden) as caught:
        Settings().network_cap().check(policy, "acme")
    assert "CORRAL_NETWORK_PRIVATE_ALLOW" in str(caught.value)
    assert repr(policy.entries[0]) in str(caught.value)


def test_private_allow_lets_exactly_its_ranges_in() -> None:
    cap = NetworkCap.parse(private_allow="10.99.0.0/16, fd00::/8")
    cap.check(NetworkPolicy.parse("allowlist", ["10.99.0.10:80", "[fd00::1]"]), "acme")
    cap.check(NetworkPolicy.parse("internet", ["10.99.1.0/24"]), "acme")
    for outside in ("10.98.0.1", "10.0.0.0/8", "169.254.169.254"):
        with pytest.raises(Forbidden, match="PRIVATE_ALLOW"):
            cap.check(NetworkPolicy.parse("allowlist", [outside]), "acme")


def test_the_allow_cap_bounds_every_entry() -> None:
    cap = NetworkCap.parse(allow_cap="*.example.com, pypi.org:443, 203.0.113.0/24")
    cap.check(
        NetworkPolicy.parse(
            "allowlist",
            ["api.example.com", "*.cdn.example.com:80", "pypi.org:443", "203.0.113.8/29"],
        ),
        "acme",
    )
    for outside in ("example.com", "pypi.org", "pypi.org:80", "files.pypi.org:443",
                    "203.0.113.0/23", "evil.test"):  # fmt: skip
        with pytest.raises(Forbidden, match="CORRAL_NETWORK_ALLOW_CAP"):
            cap.check(NetworkPolicy.parse("allowlist", [outside]), "acme")


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [("network_modes", "internet,everything", "CORRAL_NETWORK_MODES"),
     ("network_allow_cap", "exa mple.com", "CORRAL_NETWORK_ALLOW_CAP"),
     ("network_private_allow", "intranet.local", "CORRAL_NETWORK_PRIVATE_ALLOW")],
)  # fmt: skip
def test_bad_settings_are_refused_at_start_naming_the_variable(
    field: str, value: str, says: str
) -> None:
    with pytest.raises(InvalidRequest, match=says):
        Settings.from_env({f"CORRAL_{field.upper()}": value})


def test_entries_within_entries() -> None:
    def within(a: str, b: str) -> bool:
        return Rule.parse(a).within(Rule.parse(b))

    assert within("pypi.org", "pypi.org") and within("pypi.org:443", "pypi.org")
    assert not within("pypi.org", "pypi.org:443") and not within("pypi.org:80-90", "pypi.org:80")
    assert within("a.example.com", "*.example.com") and within("*.a.example.com", "*.example.com")
    assert within("*.example.com", "*.example.com") and not within("example.com", "*.example.com")
    assert not within("*.example.com", "a.example.com") and not within(
        "xexample.com", "*.example.com"
    )
    assert within("203.0.113.8/29", "203.0.113.0/24") and not within(
        "203.0.113.0/23", "203.0.113.0/24"
    )
    assert not within("203.0.113.1", "[2001:db8::/32]") and not within("pypi.org", "0.0.0.0/0")


def test_a_worker_ceiling_is_never_exceeded() -> None:
    none, internet = NetworkPolicy.parse("none"), NetworkPolicy.parse("internet")
    allowlist = NetworkPolicy.parse("allowlist", ["*.example.com", "203.0.113.0/24"])
    assert none.exceeds(none) is None and none.exceeds(allowlist) is None
    assert internet.exceeds(allowlist) == "network mode 'internet'"
    assert allowlist.exceeds(none) == "network mode 'allowlist'"
    assert NetworkPolicy.parse("allowlist", ["a.example.com:443"]).exceeds(allowlist) is None
    assert NetworkPolicy.parse("allowlist", ["pypi.org"]).exceeds(allowlist) == (
        "network allowlist entry 'pypi.org'"
    )
    # Under an internet ceiling public entries ask nothing more; private ranges do.
    assert (
        NetworkPolicy.parse("allowlist", ["pypi.org", "198.51.100.0/24"]).exceeds(internet) is None
    )
    assert NetworkPolicy.parse("internet", ["10.0.0.1"]).exceeds(internet) is not None


# -- sandboxes over the API (a real server; its own caps) -------------------------------------


@pytest.fixture(scope="module", params=DATABASES)
def capped(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LiveServer]:
    """A server where only team `ops` may use `internet` and an allowlist may name
    10.99.0.0/16 of the private ranges; on SQLite, and on PostgreSQL (the policies are
    stored with the sandboxes and jobs)."""
    live = start_server(
        settings,
        tmp_path_factory.mktemp("capped") / "data",
        pool_size=0,
        extra_env={
            "CORRAL_DATABASE_URL": database_url(request),
            "CORRAL_NETWORK_INTERNET_TEAMS": "ops",
            "CORRAL_NETWORK_PRIVATE_ALLOW": "10.99.0.0/16",
            # Its jobs stay queued: a networked one would get an uplink in the host's
            # own namespace, which is the real network (see tests/conftest.py).
            "CORRAL_JOB_WORKERS": "0",
        },
    )
    try:
        yield live
    finally:
        live.stop()


def _listed(server: LiveServer, key: str | None = None) -> list[str]:
    response = call(server, "List", {}, key=key or server.key)
    assert response.status_code == 200, response.text
    return [s["id"] for s in response.json().get("sandboxes", [])]


def _create(server: LiveServer, network: dict[str, Any], key: str = "") -> httpx.Response:
    # The process tier (allowed on test servers) enforces only `none`, and always will.
    body = {"isolation": "process", "timeoutSeconds": 60, "network": network}
    return call(server, "Create", body, key=key)


def test_create_refuses_what_the_server_does_not_allow_and_changes_nothing(
    capped: LiveServer,
) -> None:
    before = _listed(capped)
    message = error(_create(capped, {"mode": "internet"}), 403, "permission_denied")
    assert "'default'" in message and "CORRAL_NETWORK_INTERNET_TEAMS" in message
    message = error(
        _create(capped, {"mode": "allowlist", "allow": ["pypi.org", "10.0.0.1"]}),
        403,
        "permission_denied",
    )
    assert "'10.0.0.1/32'" in message and "CORRAL_NETWORK_PRIVATE_ALLOW" in message
    message = error(
        _create(capped, {"mode": "allowlist", "allow": ["exa mple.com"]}), 400, "invalid_argument"
    )
    assert "'exa mple.com'" in message and "pypi.org:443" in message
    message = error(_create(capped, {"mode": "everything"}), 400, "invalid_argument")
    assert "none, internet, allowlist" in message
    message = error(
        _create(capped, {"mode": "none", "allow": ["pypi.org"]}), 400, "invalid_argument"
    )
    assert "'allowlist'" in message
    # Within the caps, but the tier cannot enforce it: refused by the tier, saying so.
    allowed = {"mode": "allowlist", "allow": ["pypi.org:443", "10.99.0.10"]}
    message = error(_create(capped, allowed), 400, "failed_precondition")
    assert "network mode 'allowlist'" in message
    assert _listed(capped) == before


def test_a_team_named_by_the_operator_gets_internet_past_the_cap(capped: LiveServer) -> None:
    ops = capped.new_team("ops")
    message = error(_create(capped, {"mode": "allow_all"}, key=ops), 400, "failed_precondition")
    assert "network mode 'internet'" in message  # the cap let it through to the tier


def test_get_and_list_show_the_policy_and_update_network_goes_to_the_sandbox(
    capped: LiveServer,
) -> None:
    created = _create(capped, {})
    assert created.status_code == 200, created.text
    sandbox = created.json()["sandbox"]
    try:
        assert sandbox["network"] == {"mode": "none"}
        got = call(capped, "Get", {"sandboxId": sandbox["id"]}).json()["sandbox"]
        assert got["network"] == {"mode": "none"}
        listed = call(capped, "List", {}).json()["sandboxes"]
        assert [s["network"] for s in listed if s["id"] == sandbox["id"]] == [{"mode": "none"}]
        # The same policy again: the sandbox takes it.
        same = call(
            capped, "UpdateNetwork", {"sandboxId": sandbox["id"], "network": {"mode": "deny_all"}}
        )
        assert same.status_code == 200, same.text
        assert same.json()["sandbox"]["network"] == {"mode": "none"}
        # A change the tier refuses: FAILED_PRECONDITION with its reason; nothing changed.
        change = {
            "sandboxId": sandbox["id"],
            "network": {"mode": "allowlist", "allow": ["pypi.org"]},
        }
        message = error(call(capped, "UpdateNetwork", change), 400, "failed_precondition")
        assert "process tier" in message and "network" in message  # the tier's reason
        # Refused by the cap before the sandbox is asked.
        internet = {"sandboxId": sandbox["id"], "network": {"mode": "internet"}}
        error(call(capped, "UpdateNetwork", internet), 403, "permission_denied")
        got = call(capped, "Get", {"sandboxId": sandbox["id"]}).json()["sandbox"]
        assert got["network"] == {"mode": "none"}
    finally:
        call(capped, "Kill", {"sandboxId": sandbox["id"]})
    gone = {"sandboxId": sandbox["id"], "network": {"mode": "none"}}
    error(call(capped, "UpdateNetwork", gone), 400, "failed_precondition")
    unknown = {"sandboxId": "sb_nope", "network": {"mode": "none"}}
    error(call(capped, "UpdateNetwork", unknown), 404, "not_found")


def test_a_stored_policy_comes_back_as_written(store: Store) -> None:
    """What Get and List show is what the row holds (real SQLite)."""
    team = store.create_team("acme")
    policy = NetworkPolicy.parse("allowlist", ["PyPI.org:443", "*.example.com", "2001:db8::/32"])
    row = new_sandbox_row(team, network=network_json(policy))
    store.insert_sandbox(row)
    stored = store.sandbox(row.id)
    assert stored is not None
    record = SandboxRecord.from_row(stored)
    assert record.network == policy
    message = convert.sandbox(record).network
    assert (message.mode, list(message.allow)) == (
        "allowlist",
        ["pypi.org:443", "*.example.com", "[2001:db8::/32]"],
    )


# -- jobs ------------------------------------------------------------------------------------


def test_job_specs_carry_a_mode_and_entries_in_normal_form() -> None:
    spec = JobSpec.from_dict(
        {
            "command": ["true"],
            "network": "allowlist",
            "network_allow": ["PyPI.org:443", "203.0.113.0/24"],
            "limits": {"bandwidth_mbit": 10, "connections": 32},
        }
    )
    assert (spec.network, spec.network_allow) == ("allowlist", ("pypi.org:443", "203.0.113.0/24"))
    assert spec.limits == {"bandwidth_mbit": 10, "connections": 32}
    assert JobSpec.from_dict(spec.to_dict()) == spec
    assert JobSpec.from_proto(spec.to_proto()) == spec
    assert JobSpec.from_dict({"command": ["true"], "network": "allow_all"}).network == "internet"
    assert JobSpec.from_dict({"command": ["true"]}).network_policy == NetworkPolicy()


@pytest.mark.parametrize(
    ("data", "starts", "says"),
    [({"network_allow": ["pypi.org"]}, "network_allow: ", "use mode 'allowlist'"),
     ({"network": "allowlist", "network_allow": ["pypi.org:https"]}, "network_allow: ", "1-65535"),
     ({"network": "allowlist", "network_allow": "pypi.org"}, "network_allow: ", "a list"),
     ({"network": "host"}, "network: ", "none, internet, allowlist"),
     ({"limits": {"connections": -1}}, "limits: ", "connections")],
)  # fmt: skip
def test_bad_job_networks_are_refused_naming_the_field(
    data: dict[str, Any], starts: str, says: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        JobSpec.from_dict({"command": ["true"], **data})
    assert str(caught.value).startswith(starts) and says in str(caught.value)


def _submit(server: LiveServer, spec: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/corral.v1.JobService/Submit",
        json={"spec": spec},
        headers={"Authorization": f"Bearer {server.key}"},
        timeout=30,
    )


def test_submit_refuses_what_the_server_does_not_allow(capped: LiveServer) -> None:
    message = error(
        _submit(capped, {"command": ["true"], "network": "internet"}), 403, "permission_denied"
    )
    assert "CORRAL_NETWORK_INTERNET_TEAMS" in message
    private = {"command": ["true"], "network": "allowlist", "networkAllow": ["169.254.169.254"]}
    message = error(_submit(capped, private), 403, "permission_denied")
    assert "'169.254.169.254/32'" in message and "link-local" in message
    listed = httpx.post(
        f"{capped.url}/corral.v1.JobService/List",
        json={},
        headers={"Authorization": f"Bearer {capped.key}"},
        timeout=30,
    )
    assert listed.status_code == 200 and listed.json().get("jobs", []) == []
    allowed = {"command": ["true"], "network": "allowlist", "networkAllow": ["10.99.0.10:80"]}
    queued = _submit(capped, allowed)
    assert queued.status_code == 200, queued.text
    spec = queued.json()["job"]["spec"]
    assert (spec["network"], spec["networkAllow"]) == ("allowlist", ["10.99.0.10/32:80"])


@pytest.mark.usefixtures("sandbox_host")
async def test_a_worker_runs_no_job_that_asks_more_than_it_allows(settings: Settings) -> None:
    with private_runtime(settings) as own:
        store = Store.open(own)
        try:
            team = store.create_team("acme")
            queue = JobQueue(store, own)
            wants = JobSpec.from_dict(
                {"command": ["true"], "network": "allowlist", "network_allow": ["pypi.org"]}
            )
            more, _, _ = await queue.submit(team, wants)
            within, _, _ = await queue.submit(team, JobSpec.from_dict({"command": ["true"]}))
            ceiling = Policy(network=NetworkPolicy.parse("allowlist", ["*.example.com"]))
            async with Engine(own) as engine:
                worker = Worker(own, store, engine=engine, policy=ceiling, pool_size=0)
                await worker.start()
                try:
                    ended = [await _final(store, row.id) for row in (more, within)]
                finally:
                    await worker.aclose()
        finally:
            store.close()
    assert ended[0].state == "failed", ended[0]
    assert "network allowlist entry 'pypi.org'" in ended[0].state_reason
    assert "more than this worker allows" in ended[0].state_reason
    assert ended[1].state == "succeeded", ended[1]


async def _final(store: Store, job_id: str) -> JobRow:
    def final() -> JobRow | None:
        row = store.job(job_id)
        return row if row is not None and row.final else None

    return await until(final, f"job {job_id} to end")


# -- the SDK ---------------------------------------------------------------------------------


def test_the_sdk_checks_a_policy_before_any_call() -> None:
    nowhere: dict[str, Any] = {"server": "http://127.0.0.1:9", "api_key": "k"}  # never reached
    with pytest.raises(InvalidRequest, match=r"'exa mple\.com'"):
        Sandbox.create(network={"mode": "allowlist", "allow": ["exa mple.com"]}, **nowhere)
    with pytest.raises(InvalidRequest, match="not both"):
        Sandbox.create(network="internet", allow_internet_access=True, **nowhere)
    with pytest.raises(InvalidRequest, match="unknown keys"):
        Sandbox.create(network={"mode": "allowlist", "hosts": ["pypi.org"]}, **nowhere)
    with pytest.raises(InvalidRequest, match="none, internet, allowlist"):
        Sandbox.create(network="everything", **nowhere)
    assert Network.of({"mode": "allow_all"}) == Network("internet")
    assert Network.parse("allowlist", ["PyPI.org"]) == Network("allowlist", ("pypi.org",))
    assert (
        str(Network("allowlist", ("pypi.org", "*.x.org:443"))) == "allowlist: pypi.org, *.x.org:443"
    )


def test_the_sync_sdk_shows_and_changes_a_sandboxs_network(capped: LiveServer) -> None:
    with pytest.raises(Forbidden, match="CORRAL_NETWORK_INTERNET_TEAMS"):
        Sandbox.create(isolation="process", allow_internet_access=True, **opts(capped))
    with Sandbox.create(isolation="process", allow_internet_access=False, **opts(capped)) as sbx:
        assert sbx.network == Network("none") == sbx.info.network
        assert sbx.info.limits.connections == 1024 and sbx.info.limits.bandwidth_mbit == 0
        assert sbx.update_network("none").network == Network("none")
        with pytest.raises(IsolationUnavailable, match="process tier"):
            sbx.update_network("allowlist", allow=["pypi.org"])
        with pytest.raises(Forbidden, match="CORRAL_NETWORK_PRIVATE_ALLOW"):
            sbx.update_network({"mode": "allowlist", "allow": ["192.168.1.1"]})
        assert sbx.get_info().network == Network("none")
        listed = [s.network for s in Sandbox.list(**opts(capped)) if s.sandbox_id == sbx.sandbox_id]
        assert listed == [Network("none")]


async def test_the_async_sdk_creates_with_a_network_and_changes_it(capped: LiveServer) -> None:
    with pytest.raises(IsolationUnavailable, match="network mode 'allowlist'"):
        await AsyncSandbox.create(
            isolation="process",
            network={"mode": "allowlist", "allow": ["pypi.org:443"]},
            **opts(capped),
        )
    async with await AsyncSandbox.create(
        isolation="process", network="deny_all", limits=Limits(connections=64), **opts(capped)
    ) as sbx:
        assert sbx.network == Network("none") and sbx.info.limits.connections == 64
        info = await sbx.update_network(Network("none"))
        assert info.network == Network("none")


def test_jobs_submit_takes_a_network_and_its_entries(capped: LiveServer) -> None:
    with Jobs(**opts(capped)) as jobs:
        with pytest.raises(Forbidden, match="CORRAL_NETWORK_INTERNET_TEAMS"):
            jobs.submit(command=["true"], network="allow_all")
        job = jobs.submit(command=["true"], network="allowlist", network_allow=["PyPI.org:443"]).job
        assert (job.spec["network"], job.spec["network_allow"]) == ("allowlist", ["pypi.org:443"])
