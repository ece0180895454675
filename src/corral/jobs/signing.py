"""The signature on a job's callbacks: `sign` on the server, `verify` on the receiver.

`X-Corral-Signature: t=<unix time>,v1=<hex HMAC-SHA256>` over `"<t>." + body`, keyed with
the job's callback secret. A webhook receiver imports only this module (the standard
library underneath), not the delivery machinery in `callbacks.py` with its store and HTTP
client.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["sign", "verify"]


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Corral-Signature` value for `body` sent at `timestamp` (Unix seconds)."""
    return f"t={timestamp},v1={_digest(secret, body, timestamp)}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance: float = 300, now: float | None = None
) -> bool:
    """Whether `header` is a signature of `body` by `secret`, made within `tolerance`
    seconds of `now` (default: the current time). A receiver checks every POST:

        body = request.body()                       # the raw bytes, before parsing
        header = request.headers.get("X-Corral-Signature", "")
        if not verify(secret, header, body):
            return Response(status=400)             # forged, tampered with or replayed
        event = json.loads(body)                    # dedupe on X-Corral-Delivery

    Several `v1=` entries are allowed (any one matching is enough); a malformed header
    is simply not a valid signature.
    """
    timestamp: int | None = None
    signatures = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    # A signature from too far in the past (or future) may be a captured request replayed.
    if abs(current - timestamp) > tolerance:
        return False
    expected = _digest(secret, body, timestamp).encode()
    # Every candidate is compared, so timing does not reveal which (if any) matched; as
    # bytes, because compare_digest refuses str with non-ASCII characters.
    matches = [hmac.compare_digest(expected, s.encode()) for s in signatures]
    return any(matches)


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
