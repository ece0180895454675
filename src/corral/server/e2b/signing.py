"""Signed `/files` URLs: which sandbox a URL with no routing header is for.

E2B's SDK signs a download or upload URL (`Sandbox.download_url`, `upload_url`) with the
sandbox's envd access token:

    signature = "v1_" + base64(sha256("<path>:<read|write>:<username>:<token>[:<expiry>]"))

(standard alphabet, padding stripped). E2B routes such a URL by its host name; here one
URL serves every sandbox and the URL names none, so the signature itself says which:
the server computes it with each live secure sandbox's token and takes the one that
matches. A signature made with one sandbox's token matches no other sandbox, so it never
reads or writes another's files; one for "read" never uploads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from corral.errors import ServerUnavailable
from corral.server.e2b.call import EnvdCall, resolve
from corral.server.e2b.errors import E2bError

if TYPE_CHECKING:
    from corral.server.base import Services

_VERSION = "v1_"


def signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    """The signature E2B's SDK puts in a URL for these values."""
    raw = f"{path}:{operation}:{user}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return _VERSION + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def resolve_signed(services: Services, scope: dict[str, Any]) -> EnvdCall:
    """The call of a signed `/files` request, or the error to answer it with: 400 with
    no signature, 401 when it matches no sandbox or has expired, 502 when its sandbox
    is not running."""
    store = services.store
    if store is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode(), True))
    sent = query.get("signature", "")
    if not sent:
        raise E2bError(
            400,
            "name the sandbox with the header E2b-Sandbox-Id, or use a signed URL "
            "(Sandbox.download_url / upload_url of a secure sandbox)",
        )
    if not sent.startswith(_VERSION):
        raise E2bError(401, "the signature is not a v1_ signature; sign the URL again")
    expiration: int | None = None
    if query.get("signature_expiration"):
        try:
            expiration = int(query["signature_expiration"])
        except ValueError:
            raise E2bError(400, "signature_expiration must be a unix time in seconds") from None
    operation = "write" if scope["method"] == "POST" else "read"
    path, user = query.get("path", ""), query.get("username", "")
    live = [row.id for row in store.live_sandboxes()]
    for sandbox_id, row in store.e2b_sandboxes(live).items():
        token = row.envd_access_token
        if not token:
            continue
        expected = signature(path, operation, user, token, expiration)
        if hmac.compare_digest(expected.encode(), sent.encode()):
            if expiration is not None and expiration < time.time():
                # E2B's exact words: the SDK's tests compare the body.
                raise E2bError(401, "signature is already expired")
            call = resolve(services, sandbox_id, {"x-access-token": token})
            return replace(call, user=user or None)
    raise E2bError(
        401,
        f"the signature matches no running sandbox for {operation} of {path!r}: the "
        "sandbox was killed, or the URL was changed; sign a new one",
    )
