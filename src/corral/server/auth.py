"""Who is calling: the API key of `Authorization: Bearer <key>` (or E2B's `X-API-KEY`
header), resolved to a team.

The app authenticates a request from its headers before it reads the body
(`authenticate_headers`); the handler's `authenticate` then takes that team, from the
request's own context, instead of asking again.

Keys are looked up in the store once per `KEY_CACHE_SECONDS` per key (`KeyCache`), not
once per request: a busy client costs the store nothing, and a key revoked (or a quota
changed) with `corral admin`, by any process, reaches this server within that time. A
quota's enforcement does not depend on it: sandbox creates count against the team's row
read in their own transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from connectrpc.request import RequestContext

from corral import logs
from corral.errors import ServerUnavailable, Unauthenticated
from corral.store.teams import hash_key

if TYPE_CHECKING:
    from corral.server.base import Services
    from corral.store import Store, Team

_MISSING = (
    "no API key: send the header `Authorization: Bearer <key>` (the SDK and CLI take "
    "--api-key or CORRAL_API_KEY; `corral admin key create --team NAME` makes one)"
)

# How long a key's team is remembered: a revocation takes effect within this (issue 16
# asks for a second).
KEY_CACHE_SECONDS = 0.5
# Keys remembered at most; past it the expired go (and, were none expired, all).
KEY_CACHE_SIZE = 10_000

# The team `authenticate_headers` found for the request being handled (None: not asked),
# and the digest of the key it came with (what rate limits count by).
_caller: ContextVar[Team | None] = ContextVar("corral_caller", default=None)
_caller_key: ContextVar[str | None] = ContextVar("corral_caller_key", default=None)


class KeyCache:
    """Teams of API keys (by the key's digest), each remembered for `ttl` seconds.

    Only keys that authenticate are remembered: an unknown key asks the store every time,
    so a key created a moment ago works at once and guessed keys fill no memory.
    """

    def __init__(
        self, ttl: float = KEY_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._teams: dict[str, tuple[Team, float]] = {}

    def team(self, store: Store, digest: str, key: str) -> Team:
        """The team of `key` (whose sha256 is `digest`); Unauthenticated if none."""
        now = self._clock()
        found = self._teams.get(digest)
        if found is not None and found[1] > now:
            return found[0]
        team = store.authenticate(key)  # Unauthenticated for an unknown or revoked key
        if len(self._teams) >= KEY_CACHE_SIZE:
            self._teams = {d: entry for d, entry in self._teams.items() if entry[1] > now}
            if len(self._teams) >= KEY_CACHE_SIZE:
                self._teams.clear()
        self._teams[digest] = (team, now + self.ttl)
        return team


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


def caller() -> tuple[str, Team] | None:
    """The digest of the API key of the request being handled and its team (None: no
    key was checked)."""
    key, team = _caller_key.get(), _caller.get()
    return None if key is None or team is None else (key, team)


def authenticate_headers(services: Services, authorization: str) -> Team:
    """The team of an `Authorization` header's value, remembered for this request."""
    _forget()
    return _remember(services, bearer_key(authorization))


def authenticate_e2b(services: Services, api_key: str | None, authorization: str) -> Team:
    """The team of an E2B request: its `X-API-KEY` header, else `Authorization: Bearer`."""
    _forget()
    if api_key is None and not authorization.strip():
        raise Unauthenticated("no API key: " + _E2B_KEY)
    try:
        key = api_key.strip() if api_key is not None else bearer_key(authorization)
        return _remember(services, key)
    except Unauthenticated:
        raise Unauthenticated("unknown or revoked API key: " + _E2B_KEY) from None


def _forget() -> None:
    _caller.set(None)
    _caller_key.set(None)


def _remember(services: Services, key: str) -> Team:
    store = services.store
    if store is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    digest = hash_key(key)
    team = services.keys.team(store, digest, key)
    _caller.set(team)
    _caller_key.set(digest)
    logs.bind(team_id=team.id)
    return team


def authenticate(services: Services, ctx: RequestContext[Any, Any]) -> Team:
    """The caller's team: the one the app found for this request, else its key's."""
    team = _caller.get()
    if team is not None:
        return team
    return _remember(services, bearer_key(ctx.request_headers.get("authorization", "")))
