"""E2B's error shapes: REST answers `{"code": <status>, "message": …}`, envd's Connect
services answer a Connect code name. Corral's errors map through `corral._wire`'s one
table (its Connect code), so this module only turns codes into HTTP statuses.
"""

from __future__ import annotations

from typing import TypeVar

from corral._wire import code_for
from corral.errors import CorralError, Unauthenticated, UnknownUser

E = TypeVar("E", bound=Exception)

# The HTTP status of each Connect code, as E2B's API answers them.
_STATUS_OF_CODE = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "failed_precondition": 409,
    "resource_exhausted": 429,
    "unavailable": 503,
    "internal": 500,
}
_CODE_OF_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    409: "already_exists",
    429: "resource_exhausted",
    501: "unimplemented",
    502: "unavailable",
    503: "unavailable",
}


class E2bError(CorralError):
    """An E2B route refused the request with this HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def rest_status(exc: CorralError) -> int:
    """The HTTP status E2B's REST API answers `exc` with."""
    if isinstance(exc, E2bError):
        return exc.status
    return _STATUS_OF_CODE.get(code_for(as_envd(exc)), 500)


def envd_code(exc: CorralError) -> str:
    """The Connect code name envd answers `exc` with."""
    if isinstance(exc, E2bError):
        return _CODE_OF_STATUS.get(exc.status, "internal" if exc.status >= 500 else "unknown")
    return code_for(as_envd(exc))


def as_envd(exc: E) -> E | Unauthenticated:
    """`exc` as envd answers it: an unknown user is 401 there (its authentication checks
    the user a request names), a bad argument in Corral's own API."""
    if isinstance(exc, UnknownUser):
        return Unauthenticated(str(exc))
    return exc
