"""The one table between Corral's errors and Connect error codes.

The server sends a `CorralError` as the code of its most specific class in `_TABLE`, its
message (which says what to do), and an `ErrorDetail` naming its class; the SDK raises
the same class again from the detail, or, for errors without one (the HTTP stack's own,
or a server that could not be reached), the first class listed for the code.

Codes are keyed by their wire name ("not_found"), so that a client can map an error
without importing connectrpc (the CLI's fast path, `corral.client._unary`, does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from corral import errors
from corral.errors import CorralError, ServerUnavailable
from corral.v1.errors_pb2 import ErrorDetail

if TYPE_CHECKING:
    import connectrpc.errors
    from connectrpc.errors import ConnectError

_DETAIL_TYPE = ErrorDetail.DESCRIPTOR.full_name

# Most specific first: a class is sent as the code of the first entry it is a subclass of.
# For a code, the first class listed is what a client raises when no detail names one.
_TABLE: tuple[tuple[type[CorralError], str], ...] = (
    (errors.InvalidRequest, "invalid_argument"),
    (errors.FileNotFound, "not_found"),
    (errors.NotFound, "not_found"),
    (errors.Unauthenticated, "unauthenticated"),
    (errors.Forbidden, "permission_denied"),
    (errors.PermissionDenied, "permission_denied"),
    (errors.AuthError, "unauthenticated"),
    (errors.QuotaExceeded, "resource_exhausted"),
    (errors.RateLimited, "resource_exhausted"),
    (errors.CapacityExceeded, "resource_exhausted"),
    (errors.NoSpace, "resource_exhausted"),
    (errors.SandboxNotRunning, "failed_precondition"),
    (errors.PortClosed, "failed_precondition"),
    (errors.SnapshotUnavailable, "failed_precondition"),
    (errors.LayerInUse, "failed_precondition"),
    (errors.VolumeInUse, "failed_precondition"),
    (errors.TemplateInUse, "failed_precondition"),
    (errors.VmNotReady, "failed_precondition"),
    (errors.BuildFailed, "failed_precondition"),
    (errors.ImagePullFailed, "failed_precondition"),
    (errors.CommandError, "failed_precondition"),
    (errors.FileExists, "already_exists"),
    (errors.VolumeExists, "already_exists"),
    (errors.VmExists, "already_exists"),
    (errors.IdempotencyConflict, "already_exists"),
    (errors.FileError, "failed_precondition"),
    (errors.ServerUnavailable, "unavailable"),
    (errors.TemplateNotReady, "unavailable"),  # it is being built: retrying will help
    (errors.IsolationUnavailable, "failed_precondition"),  # retrying will not help
    (errors.SchemaTooNew, "failed_precondition"),
    (errors.CorralError, "internal"),
)

_CLASSES: dict[str, type[CorralError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, CorralError)
}
_DEFAULT_FOR_CODE: dict[str, type[CorralError]] = {}
for _cls, _code in reversed(_TABLE):
    _DEFAULT_FOR_CODE[_code] = _cls
_DEFAULT_FOR_CODE["deadline_exceeded"] = errors.ServerUnavailable
_DEFAULT_FOR_CODE["canceled"] = errors.ServerUnavailable


def code_for(exc: CorralError) -> str:
    """The wire name of the Connect code the server sends for `exc`."""
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return "internal"  # pragma: no cover - CorralError is the last entry


def to_connect(exc: BaseException) -> ConnectError:
    """What the server sends for `exc`: never a stack trace, always a next step."""
    # Imported here: the server has them loaded already; a client must not need them.
    import logging

    from connectrpc.code import Code
    from connectrpc.errors import ConnectError

    if isinstance(exc, ConnectError):
        return exc
    if isinstance(exc, CorralError):
        detail = ErrorDetail(type=type(exc).__name__)
        if isinstance(exc, errors.RateLimited):
            detail.retry_after_seconds = exc.retry_after
        return ConnectError(Code(code_for(exc)), str(exc), details=[_packed(detail)])
    logging.getLogger("corral.server").error("internal error", exc_info=exc)
    return ConnectError(
        Code.INTERNAL,
        "internal error in the Corral server; the server log has the details",
        details=[_packed(ErrorDetail(type="CorralError"))],
    )


def _packed(detail: ErrorDetail) -> connectrpc.errors.ErrorDetail:
    """`detail` as connectrpc sends it, packed by hand: connectrpc packs only its own
    protobuf-py messages, and ours are Google protobuf's."""
    from connectrpc.errors import ErrorDetail as Detail
    from protobuf.wkt import Any

    value = detail.SerializeToString()
    return Detail(Any(type_url=f"type.googleapis.com/{_DETAIL_TYPE}", value=value))


# What an https client hears from a plain HTTP server: rustls (pyqwest), OpenSSL (ssl).
_PLAIN_ANSWER = ("InvalidContentType", "WRONG_VERSION_NUMBER")
# What an http client hears from an HTTPS server (which closes on a plain request); a
# server that died mid-call says the same, hence only a hint.
_CLOSED = ("connection closed before message completed", "closed connection without response")


def no_answer(server: str, cause: str) -> ServerUnavailable:
    """The error for a server that did not answer: which URL, why, and how to start one."""
    if server.startswith("https:") and any(marker in cause for marker in _PLAIN_ANSWER):
        return ServerUnavailable(
            f"the server at {server} answered in plain HTTP, not HTTPS ({cause}): use its "
            "http:// URL, or start it serving HTTPS (`corral server --tls-cert FILE "
            "--tls-key FILE`, or --tls-self-signed)"
        )
    hint = ""
    if server.startswith("http:") and any(marker in cause for marker in _CLOSED):
        hint = "; if it serves HTTPS, use its https:// URL"
    return ServerUnavailable(
        f"the Corral server at {server} did not answer ({cause}); start one with"
        " `corral server` (`make run` in a clone), or name yours with --server,"
        f" CORRAL_SERVER or `corral context use`{hint}"
    )


def untrusted(server: str, cause: str) -> errors.ServerUntrusted:
    """The error for an https server whose certificate this client could not verify."""
    if any(marker in cause for marker in _OTHER_NAME):
        return errors.ServerUntrusted(
            f"the server at {server} presented a TLS certificate for another name ({cause});"
            " nothing was sent. Use a URL whose host the certificate names (`corral server "
            "--tls-self-signed` names localhost, 127.0.0.1, ::1 and the address it listens on)"
        )
    return errors.ServerUntrusted(
        f"the server at {server} presented a TLS certificate this client cannot verify "
        f"({cause}); nothing was sent. If it is your server, trust its certificate or CA "
        "with --ca-file FILE, CORRAL_CA_FILE or a context's caFile (`corral context set "
        "NAME --ca-file FILE`); `corral server --tls-self-signed` logs its certificate's "
        "path and fingerprint as it starts"
    )


# How the HTTP clients under the SDK say that a certificate did not verify: rustls
# (pyqwest, the async SDK) and OpenSSL (the ssl module, the CLI's fast path).
_UNVERIFIED = ("invalid peer certificate", "certificate verify failed")
_OTHER_NAME = ("not valid for name", "Hostname mismatch")


def error_for(code: str, message: str, details: Iterable[ErrorDetail], server: str) -> CorralError:
    """The Corral error a client raises for a Connect error from `server`.

    `code` is the Connect code's wire name, `details` the ErrorDetails the error carried
    (the class the server raised, and a RateLimited's seconds to wait).
    """
    cls: type[CorralError] | None = None
    named = False
    retry_after = 0.0
    for detail in details:
        named = True
        cls = _CLASSES.get(detail.type)
        retry_after = detail.retry_after_seconds
    if cls is None:
        cls = _DEFAULT_FOR_CODE.get(code, CorralError)
    if cls is ServerUnavailable and not named:
        # No detail: the transport failed before any Corral server answered. Its message
        # may be a chain of wrapped errors; the last link is the cause (connection refused).
        for marker in _UNVERIFIED:
            if marker in message:
                return untrusted(server, message[message.index(marker) :])
        return no_answer(server, message.rsplit(": ", 1)[-1] or code)
    if cls is ServerUnavailable and not message.startswith("the Corral server"):
        message = f"the Corral server did not answer ({message or code})"
    if cls is errors.RateLimited:
        return errors.RateLimited(message or None, retry_after or 1.0)
    return cls(message or None)


def from_connect(exc: ConnectError, server: str) -> CorralError:
    """The Corral error a client raises for a `ConnectError` (the async SDK's calls)."""
    details = []
    for detail in exc.details:
        if detail.type_name == _DETAIL_TYPE:
            with contextlib.suppress(DecodeError):
                details.append(ErrorDetail.FromString(detail.message_bytes))
    return error_for(exc.code.value, exc.message, details, server)
