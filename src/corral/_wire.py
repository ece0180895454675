"""The one table between Corral's errors and Connect error codes.

The server sends a `CorralError` as the code of its most specific class in `_TABLE`, its
message (which says what to do), and an `ErrorDetail` naming its class; the SDK raises
the same class again from the detail, or, for errors without one (the HTTP stack's own,
or a server that could not be reached), the first class listed for the code.
"""

from __future__ import annotations

import logging

from connectrpc.code import Code
from connectrpc.errors import ConnectError

from corral import errors
from corral.errors import CorralError
from corral.v1.errors_pb2 import ErrorDetail

log = logging.getLogger("corral.server")

# Most specific first: a class is sent as the code of the first entry it is a subclass of.
# For a code, the first class listed is what a client raises when no detail names one.
_TABLE: tuple[tuple[type[CorralError], Code], ...] = (
    (errors.InvalidRequest, Code.INVALID_ARGUMENT),
    (errors.FileNotFound, Code.NOT_FOUND),
    (errors.NotFound, Code.NOT_FOUND),
    (errors.Unauthenticated, Code.UNAUTHENTICATED),
    (errors.Forbidden, Code.PERMISSION_DENIED),
    (errors.PermissionDenied, Code.PERMISSION_DENIED),
    (errors.AuthError, Code.UNAUTHENTICATED),
    (errors.QuotaExceeded, Code.RESOURCE_EXHAUSTED),
    (errors.CapacityExceeded, Code.RESOURCE_EXHAUSTED),
    (errors.NoSpace, Code.RESOURCE_EXHAUSTED),
    (errors.SandboxNotRunning, Code.FAILED_PRECONDITION),
    (errors.CommandError, Code.FAILED_PRECONDITION),
    (errors.FileExists, Code.ALREADY_EXISTS),
    (errors.IdempotencyConflict, Code.ALREADY_EXISTS),
    (errors.FileError, Code.FAILED_PRECONDITION),
    (errors.ServerUnavailable, Code.UNAVAILABLE),
    (errors.IsolationUnavailable, Code.FAILED_PRECONDITION),  # retrying will not help
    (errors.CorralError, Code.INTERNAL),
)

_CLASSES: dict[str, type[CorralError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, CorralError)
}
_DEFAULT_FOR_CODE: dict[Code, type[CorralError]] = {}
for _cls, _code in reversed(_TABLE):
    _DEFAULT_FOR_CODE[_code] = _cls
_DEFAULT_FOR_CODE[Code.DEADLINE_EXCEEDED] = errors.ServerUnavailable
_DEFAULT_FOR_CODE[Code.CANCELED] = errors.ServerUnavailable


def code_for(exc: CorralError) -> Code:
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return Code.INTERNAL  # pragma: no cover - CorralError is the last entry


def to_connect(exc: BaseException) -> ConnectError:
    """What the server sends for `exc`: never a stack trace, always a next step."""
    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, CorralError):
        detail = ErrorDetail(type=type(exc).__name__)
        return ConnectError(code_for(exc), str(exc), details=[detail])
    log.error("internal error", exc_info=exc)
    return ConnectError(
        Code.INTERNAL,
        "internal error in the Corral server; the server log has the details",
        details=[ErrorDetail(type="CorralError")],
    )


def from_connect(exc: ConnectError) -> CorralError:
    """The Corral error a client raises for a Connect error from the server."""
    cls: type[CorralError] | None = None
    for any_detail in exc.details:
        detail = ErrorDetail()
        if any_detail.Unpack(detail):
            cls = _CLASSES.get(detail.type)
    if cls is None:
        cls = _DEFAULT_FOR_CODE.get(exc.code, CorralError)
    message = exc.message
    if cls is errors.ServerUnavailable and not message.startswith("the Corral server"):
        message = f"the Corral server did not answer ({message or exc.code.value})"
    return cls(message or None)
