"""A template's defaults for the sandboxes and jobs started from it: limits and a
network policy.

Given at build time (Build's `sandbox_limits`/`sandbox_network`, a recipe's `limits:`
and `sandbox_network:`), checked then (a bad one is refused before anything is made),
kept on the template's row, inherited by its snapshots. A sandbox or job started from
the template takes each limit its request leaves unset (0 on the wire) and, when its
request names no network policy, the template's; what the request sets wins. The
server's caps (NetworkCap, the host's size, team quotas) apply to the result, where
every sandbox's limits and policy are checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from corral.errors import InvalidLimits, InvalidRequest
from corral.limits import REQUEST_LIMITS, Limits
from corral.network.policy import NetworkCap, NetworkPolicy


def given_limits(values: Mapping[str, object], where: str = "limits") -> dict[str, int | float]:
    """The limit fields of `values` that are set (neither 0 nor None), by name;
    InvalidLimits for a field no request may set, or a value out of range."""
    if not isinstance(values, Mapping):
        raise InvalidLimits(f"{where} is a mapping of {', '.join(REQUEST_LIMITS)}")
    unknown = sorted(set(map(str, values)) - set(REQUEST_LIMITS))
    if unknown:
        raise InvalidLimits(
            f"{where} has the unknown field {unknown[0]!r}; use {', '.join(REQUEST_LIMITS)}"
        )
    given: dict[str, Any] = {k: v for k, v in values.items() if v not in (None, 0)}
    try:
        Limits(**given)  # each value's type and range
    except InvalidLimits as exc:
        raise InvalidLimits(f"{where}: {exc}") from None
    return given


@dataclass(frozen=True)
class SandboxDefaults:
    """What a template gives the requests that leave a limit or the network unset."""

    limits: Mapping[str, int | float] = field(default_factory=dict)
    network: NetworkPolicy | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", given_limits(self.limits, "sandbox_limits"))

    def check(self, cap: NetworkCap, team: str) -> None:
        """Refuse defaults no sandbox of `team` could start with on this server: more
        memory or cores than the host has, a network the server's cap refuses."""
        self.limits_for({}).check_host()
        if self.network is not None:
            cap.check(self.network, team)

    def limits_for(self, asked: Mapping[str, int | float]) -> Limits:
        """The limits of a request that set `asked` (the fields it set, by name)."""
        return Limits(**{**asdict(Limits()), **self.limits, **asked})

    def network_for(self, asked: NetworkPolicy | None) -> NetworkPolicy:
        """The policy of a request that named `asked` (None: it named none)."""
        if asked is not None:
            return asked
        return self.network or NetworkPolicy()

    def over(self, other: SandboxDefaults) -> SandboxDefaults:
        """These defaults, `other`'s filling what these leave unset."""
        return SandboxDefaults({**other.limits, **self.limits}, self.network or other.network)

    # -- as a template row keeps them -------------------------------------------------

    def limits_json(self) -> dict[str, int | float]:
        return dict(self.limits)

    def network_json(self) -> dict[str, Any] | None:
        if self.network is None:
            return None
        return {"mode": self.network.mode, "allow": list(self.network.entries)}

    @classmethod
    def from_json(
        cls, limits: Mapping[str, int | float] | None, network: Mapping[str, Any] | None
    ) -> SandboxDefaults:
        policy = None if network is None else NetworkPolicy.parse(network["mode"], network["allow"])
        return cls(dict(limits or {}), policy)

    @classmethod
    def from_recipe(cls, values: Mapping[str, Any]) -> SandboxDefaults:
        """A recipe's `limits:` (a mapping) and `sandbox_network:` (a mode, or a mapping
        of `mode` and `allow`), as `BuildPlan.sandbox` carries them."""
        network = values.get("sandbox_network")
        policy = None
        if isinstance(network, str):
            policy = NetworkPolicy.parse(network)
        elif isinstance(network, Mapping):
            unknown = sorted(set(map(str, network)) - {"mode", "allow"})
            if unknown:
                raise InvalidRequest(
                    f"recipe: sandbox_network has the unknown key {unknown[0]!r}; "
                    "give `mode` and `allow`"
                )
            policy = NetworkPolicy.parse(network.get("mode") or "", network.get("allow") or ())
        elif network is not None:
            raise InvalidRequest(
                "recipe: sandbox_network is a mode (none, internet, allowlist) or a mapping "
                "of `mode` and `allow`"
            )
        return cls(given_limits(values.get("limits") or {}, "recipe: limits"), policy)
