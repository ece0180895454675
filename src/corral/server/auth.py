"""Who is calling: the API key of `Authorization: Bearer <key>` (or E2B's `X-API-KEY`
header), resolved to a team.

The app authenticates a request from its headers before it reads the body
(`authenticate_headers`); the handler's `authenticate` then takes that team, from the
request's own context, instead of asking the store a second time.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from connectrpc.request import RequestContext

from corral import logs
from corral.errors import Unauthenticated

if TYPE_CHECKING:
    from corral.store import Store, Team

_MISSING = (
    "no API key: send the header `Authorization: Bearer <key>` (the SDK and CLI take "
    "--api-key or CORRAL_API_KEY; `corral admin key create --team NAME` makes one)"
)


# The team `authenticate_headers` found for the request being handled (None: not asked).
_caller: ContextVar[Team | None] = ContextVar("corral_caller", default=None)


def bearer_key(authorization: str) -> str:
    """The key of an `Authorization` header's value."""
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated(_MISSING)
    return key.strip()


_E2B_KEY = (
    "send the header `X-API-KEY: <key>` (the e2b SDK sends E2B_API_KEY); an admin "
    "creates one with `corral admin key create --team TEAM --e2b`"
)


def authenticate_headers(store: Store, authorization: str) -> Team:
    """The team of an `Authorization` header's value, remembered for this request."""
    _caller.set(None)
    return _remember(store.authenticate(bearer_key(authorization)))


def authenticate_e2b(store: Store, api_key: str | None, authorization: str) -> Team:
    """The team of an E2B request: its `X-API-KEY` header, else `Authorization: Bearer`."""
    _caller.set(None)
    if api_key is None and not authorization.strip():
        raise Unauthenticated("no API key: " + _E2B_KEY)
    try:
        key = api_key.strip() if api_key is not None else bearer_key(authorization)
        return _remember(store.authenticate(key))
    except Unauthenticated:
        raise Unauthenticated("unknown or revoked API key: " + _E2B_KEY) from None


def _remember(team: Team) -> Team:
    _caller.set(team)
    logs.bind(team_id=team.id)
    return team


def authenticate(store: Store, ctx: RequestContext[Any, Any]) -> Team:
    """The caller's team; a revoked key fails on its next call (nothing is cached across
    requests)."""
    team = _caller.get()
    if team is not None:
        return team
    team = store.authenticate(bearer_key(ctx.request_headers.get("authorization", "")))
    logs.bind(team_id=team.id)
    return team
