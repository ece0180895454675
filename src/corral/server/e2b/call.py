"""Who an envd request is for and from: the sandbox (header `E2b-Sandbox-Id`), its team,
the user to act as, and whether the caller proved the right to it.

E2B's envd runs inside each sandbox and trusts its network edge; here one server answers
for every sandbox, so each request is checked:

- A sandbox created with `secure: true` (the SDK's default) needs `X-Access-Token` equal
  to its envd access token (401 otherwise). One created with `secure: false` is reached
  by its id, as on E2B.
- A sandbox that was not created through E2B's API has no envd token: it needs the
  owning team's API key (`X-API-KEY`), as Corral's own API does.
- An `X-API-KEY`, when sent, must be the sandbox's team's: another team's sandbox gets
  the same 404 as an unknown one.
- The user is `Authorization: Basic base64("<user>:")` (None: the template's default).

Handlers of envd's services read the call with `current_call()`; `EnvdApp` sets it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corral.errors import CorralError, ServerUnavailable, Unauthenticated
from corral.server.auth import authenticate_e2b
from corral.server.e2b.errors import E2bError

if TYPE_CHECKING:
    from corral.server.base import Services
    from corral.store import Team


@dataclass(frozen=True)
class EnvdCall:
    team: Team
    sandbox_id: str
    user: str | None  # None: the template's default user
    secure: bool  # the sandbox has an envd access token (and the caller sent it)


_current: ContextVar[EnvdCall | None] = ContextVar("corral_envd_call", default=None)


def current_call() -> EnvdCall:
    """The envd call being handled (set by `EnvdApp` before it hands the request on)."""
    call = _current.get()
    if call is None:
        raise RuntimeError("current_call() outside an envd request")
    return call


def set_current(call: EnvdCall) -> None:
    _current.set(call)


def not_running(sandbox_id: str, why: str = "") -> E2bError:
    """What E2B's edge answers for a sandbox it cannot reach (the SDK says "timeout")."""
    detail = f" ({why})" if why else ""
    return E2bError(
        502,
        f"sandbox {sandbox_id} is not running{detail}: it was killed, paused or timed out, "
        "or never existed; resume a paused one with Sandbox.connect",
    )


def basic_user(authorization: str) -> str | None:
    """The user of `Authorization: Basic base64("<user>:")`; None without the header."""
    if not authorization.strip():
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise E2bError(
            400, 'envd takes the user as `Authorization: Basic base64("<user>:")`, no other scheme'
        )
    try:
        user = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        raise E2bError(400, 'the Authorization header is not Basic base64("<user>:")') from None
    return user or None


def resolve(services: Services, sandbox_id: str, headers: dict[str, str]) -> EnvdCall:
    """The call of an envd request for `sandbox_id` with these (lower-case) headers, or
    the error to answer: 502 not running, 401 wrong token, 404 another team's."""
    store = services.store
    if store is None or services.manager is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    target = store.envd_target(sandbox_id) if isinstance(sandbox_id, str) else None
    if target is None:
        raise not_running(sandbox_id)
    team = target.team
    api_key = headers.get("x-api-key")
    if api_key is not None:
        try:
            caller = authenticate_e2b(services, api_key, "")
        except CorralError:
            caller = None
        if caller is None or caller.id != team.id:
            raise E2bError(404, f"no sandbox {sandbox_id!r}; check the id (Sandbox.list)")
    token = target.envd_access_token or ""
    if token:
        sent = headers.get("x-access-token", "")
        if not hmac.compare_digest(sent.encode(), token.encode()):
            raise E2bError(
                401,
                f"sandbox {sandbox_id} is secure: send its envdAccessToken (from create or "
                "connect) as the header X-Access-Token",
            )
    elif target.envd_access_token is None and api_key is None:
        raise Unauthenticated(
            f"sandbox {sandbox_id} was not created through E2B's API: send its team's API "
            "key as the header X-API-KEY"
        )
    # The live state first: a sandbox being killed is still "running" in the store until
    # its end is recorded, and /health must say 502 (the SDK probes it as the end nears).
    state = services.manager.live_state(sandbox_id) or target.state
    if state != "running":
        raise not_running(sandbox_id, state)
    user = basic_user(headers.get("authorization", ""))
    return EnvdCall(team=team, sandbox_id=sandbox_id, user=user, secure=bool(token))
