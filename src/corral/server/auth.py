"""Who is calling: the API key of `Authorization: Bearer <key>`, resolved to a team."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from connectrpc.request import RequestContext

from corral.errors import Unauthenticated

if TYPE_CHECKING:
    from corral.store import Store, Team

_MISSING = (
    "no API key: send the header `Authorization: Bearer <key>` (the SDK and CLI take "
    "--api-key or CORRAL_API_KEY; `corral admin key create --team NAME` makes one)"
)


def bearer_key(authorization: str) -> str:
    """The key of an `Authorization` header's value."""
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated(_MISSING)
    return key.strip()


def authenticate(store: Store, ctx: RequestContext[Any, Any]) -> Team:
    """The caller's team; a revoked key fails on its next call (nothing is cached)."""
    return store.authenticate(bearer_key(ctx.request_headers().get("authorization", "")))
