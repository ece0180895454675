"""E2B's network options as Corral network policies.

E2B says what a sandbox may reach with `allow_internet_access` (default true) and
`network: {allowOut, denyOut, allowPublicTraffic, maskRequestHost, rules}`; allowed
entries win over denied ones. Corral's policy (`corral.network.policy`) is an allowlist
over a mode, enforced by the kernel in the sandbox's network namespace, so:

- nothing denied                 → `internet`, plus allowOut (private CIDRs named there
                                   are let in, as E2B's precedence says);
- `0.0.0.0/0` (or `::/0`) denied, or internet access off
                                 → `allowlist` of allowOut (CIDRs, addresses, domains),
                                   or `none` when allowOut is empty;
- other denyOut entries          → refused, unless they lie in the ranges Corral always
                                   denies (private, link-local, …), where they change
                                   nothing: Corral cannot carve a hole out of `internet`.

A create body that asks nothing narrower than `allow_internet_access: true` (the SDK
always sends it) gets its template's default network, else CORRAL_E2B_NETWORK (`none` by
default, Corral's fail-closed default that keeps the warm pool; `internet` is E2B's);
what a body asks is checked against the server's cap like any policy.

`allowPublicTraffic` (default true) is Corral's `public_ports`: false makes the port
proxy ask for the sandbox's traffic access token. `maskRequestHost` (rewriting the Host
header of proxied requests) and per-domain `rules` (header injection by an egress proxy)
are refused: Corral's port proxy forwards the Host header as sent, and it has no egress
proxy that rewrites requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.errors import InvalidRequest, ServerUnavailable
from corral.network.policy import NetworkPolicy, Rule
from corral.server.e2b.rest import RestRequest, RestResponse, Route

if TYPE_CHECKING:
    from corral.server.base import Services
    from corral.templates.defaults import SandboxDefaults

_EVERYTHING = ("0.0.0.0/0", "::/0")


def _entries(network: dict[str, Any], key: str) -> list[str]:
    value = network.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"network.{key} must be a list of strings (CIDRs, addresses)")
    return value


def _network(body: dict[str, Any]) -> dict[str, Any]:
    network = body.get("network")
    if network is None:
        return {}
    if not isinstance(network, dict):
        raise InvalidRequest("network must be an object: {allowOut, denyOut, ...}")
    return network


def network_policy(body: dict[str, Any]) -> NetworkPolicy:
    """The policy of a create body (`NewSandbox`) or of a network update's body wrapped
    as `{"allow_internet_access": …, "network": <SandboxNetworkUpdateConfig>}`."""
    network = _network(body)
    internet = body.get("allow_internet_access", body.get("allowInternetAccess", True))
    if internet is None:
        internet = True
    if not isinstance(internet, bool):
        raise InvalidRequest(f"allow_internet_access must be true or false, got {internet!r}")
    for key, why in (
        ("maskRequestHost", "Corral's port proxy forwards the Host header as sent"),
        ("rules", "Corral has no egress proxy that rewrites requests"),
        ("egressProxy", "Corral has no egress proxy"),
    ):
        if network.get(key):
            raise InvalidRequest(f"network.{key} is not supported: {why}; leave it out")
    allow = _entries(network, "allowOut")
    deny = _entries(network, "denyOut")
    deny_all = not internet
    for entry in deny:
        if entry.strip() in _EVERYTHING:
            deny_all = True
            continue
        rule = Rule.parse(entry)
        if rule.network is None:
            raise InvalidRequest(
                f"network.denyOut entry {entry!r} is a name: denyOut takes CIDRs or addresses"
            )
        if rule.private() is None:
            raise InvalidRequest(
                f"network.denyOut entry {entry!r}: Corral cannot deny one public range while "
                "allowing the rest of the internet; deny 0.0.0.0/0 and list what the sandbox "
                "may reach in allowOut"
            )
        # In an always-denied range: denied already (unless allowOut names it: allow wins).
    if deny_all:
        return NetworkPolicy.parse("allowlist" if allow else "none", allow)
    return NetworkPolicy.parse("internet", allow)


def create_policy(
    body: dict[str, Any], defaults: SandboxDefaults, default_mode: str
) -> NetworkPolicy:
    """The policy of a new sandbox (its create body, `NewSandbox`). What the body asks
    (internet access off, allowOut/denyOut) is that policy, for the server's cap to
    check; a body that asks nothing narrower (`allow_internet_access` true, the SDK's
    default) gets its template's default network, else `default_mode`
    (CORRAL_E2B_NETWORK: `none`, or E2B's `internet`)."""
    asked = network_policy(body)  # every field checked, whatever is used
    network = _network(body)
    internet = body.get("allow_internet_access", body.get("allowInternetAccess"))
    if internet is False or _entries(network, "allowOut") or _entries(network, "denyOut"):
        return asked
    return defaults.network or NetworkPolicy.parse(default_mode)


def public_traffic(body: dict[str, Any]) -> bool:
    """Whether anyone may reach the sandbox's ports (E2B's `allowPublicTraffic`, default
    true), or only callers with its traffic access token."""
    value = _network(body).get("allowPublicTraffic", True)
    if value is None:
        return True
    if not isinstance(value, bool):
        raise InvalidRequest(f"network.allowPublicTraffic must be true or false, got {value!r}")
    return value


def network_body(policy: NetworkPolicy, public_ports: bool) -> dict[str, Any]:
    """The create body's fields for `policy` (`network_policy`'s inverse), to create a
    sandbox reaching what another reaches (a fork)."""
    network: dict[str, Any] = {"allowPublicTraffic": public_ports}
    if policy.mode == "none":
        return {"allow_internet_access": False, "network": network}
    network["allowOut"] = list(policy.entries)
    if policy.mode == "allowlist":
        network["denyOut"] = ["0.0.0.0/0"]
    return {"allow_internet_access": True, "network": network}


async def update_network(services: Services, req: RestRequest) -> RestResponse:
    """`PUT /sandboxes/{sandboxID}/network` (SandboxNetworkUpdateConfig): replaces what
    the running sandbox may reach; a field left out is cleared (so `{}` is internet)."""
    manager = services.manager
    if manager is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    body = req.json_object()
    wrapped = {
        "allow_internet_access": body.get("allow_internet_access", True),
        "network": {k: v for k, v in body.items() if k != "allow_internet_access"},
    }
    await manager.update_network(req.team, req.params["sandboxID"], network_policy(wrapped))
    return RestResponse(204)


ROUTES = [Route("PUT", "/sandboxes/{sandboxID}/network", update_network)]
