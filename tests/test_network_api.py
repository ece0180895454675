"""The network policy through the API: the server's caps, sandboxes' stored and changed
policies, jobs' network fields, and the SDK (real server, real SQLite)."""

from __future__ import annotations

import pytest

from corral.config import Settings
from corral.errors import Forbidden, InvalidRequest
from corral.network.policy import NetworkCap, NetworkPolicy, Rule

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
