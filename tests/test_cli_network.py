"""`--network`, `--allow` and `corral sandbox network`, run as users run them, against a
server whose operator let only team `ops` use `internet` (the `capped` server)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import LiveServer
from tests.test_network_api import capped  # noqa: F401  (the fixture, for this module too)

pytestmark = pytest.mark.acceptance

EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_AUTH = 2, 3, 5


def _listed(server: LiveServer) -> list[str]:
    done = server.corral("sandbox", "list", "-o", "json")
    assert done.returncode == 0, done.stderr
    return [s["sandbox_id"] for s in json.loads(done.stdout)]


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--network", "everything"], "none, internet, allowlist"),
     (["--allow", "exa mple.com"], "pypi.org:443"),
     (["--network", "none", "--allow", "pypi.org"], "use mode 'allowlist'"),
     (["--network", "allowlist", "--allow", "pypi.org:https"], "1-65535")],
)  # fmt: skip
def test_bad_network_options_exit_2_saying_what_to_write(
    capped: LiveServer,  # noqa: F811
    args: list[str],
    says: str,
) -> None:
    before = _listed(capped)
    for command, after in ((["sandbox", "create"], []), (["run"], ["--", "true"]),
                           (["job", "submit"], ["--", "true"])):  # fmt: skip
        done = capped.corral(*command, "--isolation", "process", *args, *after)
        assert done.returncode == EXIT_USAGE, (command, done.stderr)
        assert says in done.stderr and "--network/--allow" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert _listed(capped) == before
    jobs = capped.corral("job", "list", "-o", "json", "--limit", "0")
    assert not any(j["spec"].get("network_allow") == ["pypi.org"] for j in json.loads(jobs.stdout))


def test_what_the_operator_forbids_exits_5_saying_whom_to_ask(capped: LiveServer) -> None:  # noqa: F811
    for command in (["run", "--network", "allow_all", "--", "true"],
                    ["sandbox", "create", "--network", "internet"],
                    ["job", "submit", "--network", "internet", "--", "true"]):  # fmt: skip
        done = capped.corral(*command)
        assert done.returncode == EXIT_AUTH, (command, done.stderr)
        assert "CORRAL_NETWORK_INTERNET_TEAMS" in done.stderr
    done = capped.corral("run", "--allow", "169.254.169.254", "--", "true")
    assert done.returncode == EXIT_AUTH and "CORRAL_NETWORK_PRIVATE_ALLOW" in done.stderr


def test_allow_alone_asks_for_an_allowlist(capped: LiveServer) -> None:  # noqa: F811
    # The process tier enforces only `none`: the refusal names the mode it was asked for.
    done = capped.corral("run", "--isolation", "process", "--allow", "pypi.org", "--", "true")
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    assert "network mode 'allowlist'" in done.stderr


def test_sandbox_create_get_list_and_network(capped: LiveServer) -> None:  # noqa: F811
    made = capped.corral(
        "sandbox", "create", "--isolation", "process", "--network", "deny_all",
        "--connections", "64", "-o", "json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    sandbox_id = info["sandbox_id"]
    try:
        assert info["network"] == {"mode": "none", "allow": []}
        assert info["limits"]["connections"] == 64
        got = capped.corral("sandbox", "get", sandbox_id)
        assert got.returncode == 0 and "network" in got.stdout.splitlines()[0]
        assert " none " in got.stdout.splitlines()[1]
        listed = capped.corral("sandbox", "list")
        assert "network" in listed.stdout.splitlines()[0]
        same = capped.corral("sandbox", "network", sandbox_id, "none")
        assert (same.returncode, same.stdout) == (0, f"{sandbox_id} network none\n"), same.stderr
        refused = capped.corral(
            "sandbox", "network", sandbox_id, "allowlist", "--allow", "pypi.org"
        )
        assert refused.returncode == EXIT_UNAVAILABLE, refused.stderr
        assert "process tier" in refused.stderr and "network" in refused.stderr
        bad = capped.corral("sandbox", "network", sandbox_id, "intranet")
        assert bad.returncode == EXIT_USAGE and "none, internet, allowlist" in bad.stderr
        got = capped.corral("sandbox", "get", sandbox_id, "-o", "json")
        assert json.loads(got.stdout)["network"] == {"mode": "none", "allow": []}
    finally:
        capped.corral("sandbox", "kill", sandbox_id)


def test_job_submit_sends_the_network_and_limits(capped: LiveServer) -> None:  # noqa: F811
    done = capped.corral(
        "job", "submit", "--network", "allowlist", "--allow", "PyPI.org:443",
        "--allow", "10.99.0.10", "--bandwidth-mbit", "8", "--connections", "16",
        "-o", "json", "--", "true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout)["job"]["spec"]
    assert spec["network"] == "allowlist"
    assert spec["network_allow"] == ["pypi.org:443", "10.99.0.10/32"]
    assert spec["limits"] == {"bandwidth_mbit": 8, "connections": 16}
