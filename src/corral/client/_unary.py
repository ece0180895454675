"""A Connect unary call over the standard library's `http.client`, with no event loop.

The async SDK speaks through connectrpc and pyqwest; importing those and starting a
transport costs ~0.25 s, a hundred times what a `List` takes on the server. A short-lived
process (the CLI) that makes one or two unary calls uses this instead: a POST of the
binary request, the binary reply or a Connect JSON error back
(https://connectrpc.com/docs/protocol/#unary-request). Errors become the same Corral
errors as on the async path (`corral._wire.error_for`).
"""

from __future__ import annotations

import binascii
import http.client
import json
import ssl  # http.client imports it already
from base64 import b64decode
from typing import Any, TypeVar
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError, Message

from corral._wire import error_for, no_answer, untrusted
from corral.client._config import ClientSettings
from corral.client._tls import ssl_context
from corral.client._tracecontext import trace_headers
from corral.errors import CorralError
from corral.v1.errors_pb2 import ErrorDetail

M = TypeVar("M", bound=Message)

# What a reply whose body is not a Connect error means, by HTTP status (the protocol's
# table; any other status is "unknown").
_CODE_FOR_STATUS = {
    400: "internal",
    401: "unauthenticated",
    403: "permission_denied",
    404: "unimplemented",
    429: "unavailable",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}
_DETAIL_TYPE = ErrorDetail.DESCRIPTOR.full_name


def call(settings: ClientSettings, method: str, request: Message, reply_type: type[M]) -> M:
    """Call `method` ("corral.v1.SandboxService/List") on the server; its reply or the
    Corral error it sent."""
    url = urlsplit(f"{settings.server}/{method}")
    headers = {
        "content-type": "application/proto",
        "connect-protocol-version": "1",
        "connect-timeout-ms": str(max(1, int(settings.timeout * 1000))),
    }
    if settings.api_key:
        headers["authorization"] = f"Bearer {settings.api_key}"
    headers.update(trace_headers())  # the caller's trace, if it has a current span
    connection = _connection(url.scheme, url.hostname or "", url.port, settings)
    try:
        connection.request("POST", url.path, body=request.SerializeToString(), headers=headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise _unreachable(settings.server, exc) from None
    finally:
        connection.close()
    if response.status != 200:
        raise _error(settings.server, response.status, body)
    content_type = response.getheader("content-type", "")
    if content_type != "application/proto":
        raise CorralError(
            f"{settings.server} answered {method} with {content_type or 'no content-type'},"
            " not a Corral API reply: is --server the Corral server's URL?"
        )
    try:
        return reply_type.FromString(body)
    except DecodeError:
        raise CorralError(
            f"{settings.server} answered {method} with a reply this SDK cannot read:"
            " is --server the Corral server's URL?"
        ) from None


def _connection(
    scheme: str, host: str, port: int | None, settings: ClientSettings
) -> http.client.HTTPConnection:
    if scheme == "https":
        context = ssl_context(settings.ca_file)
        return http.client.HTTPSConnection(host, port, timeout=settings.timeout, context=context)
    return http.client.HTTPConnection(host, port, timeout=settings.timeout)


def _unreachable(server: str, exc: BaseException) -> CorralError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return untrusted(server, f"certificate verify failed: {exc.verify_message}")
    # "Connection refused", "timed out", "Remote end closed connection without response"
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return no_answer(server, cause or type(exc).__name__)


def _error(server: str, status: int, body: bytes) -> CorralError:
    """The Corral error for a Connect error reply (or any other non-200 answer)."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        # Not from a Connect server (a proxy, another service): only the status speaks.
        phrase = http.client.responses.get(status, str(status))
        return error_for(_CODE_FOR_STATUS.get(status, "unknown"), phrase, (), server)
    code, message = data.get("code"), data.get("message")
    return error_for(
        code if isinstance(code, str) and code else _CODE_FOR_STATUS.get(status, "unknown"),
        message if isinstance(message, str) else "",
        _details(data),
        server,
    )


def _details(data: dict[str, Any]) -> list[ErrorDetail]:
    """The ErrorDetails the error carries; other or malformed details skipped."""
    found = []
    details = data.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict) or detail.get("type") != _DETAIL_TYPE:
            continue
        try:
            value = b64decode(str(detail.get("value", "")) + "===")
            found.append(ErrorDetail.FromString(value))
        except (binascii.Error, DecodeError):
            continue
    return found
