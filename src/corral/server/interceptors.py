"""What happens around every RPC: errors become Connect errors, failures are logged.

`ErrorInterceptor` is the server's one boundary for errors: whatever a handler raises
leaves as the Connect code of `corral._wire`'s table with the Corral message, never as
a stack trace (that goes to the log).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext

from corral._wire import to_connect
from corral.server.tracing import rpc_failed

log = logging.getLogger("corral.server")

REQ = TypeVar("REQ")
RES = TypeVar("RES")

# Codes that mean the caller got something wrong: logged at debug, not as failures.
_CALLER_CODES = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.UNAUTHENTICATED,
    Code.PERMISSION_DENIED,
    Code.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
    Code.CANCELED,
}


def _translate(exc: Exception, ctx: RequestContext[Any, Any]) -> ConnectError:
    error = to_connect(exc)
    method = ctx.method.name
    callers_fault = error.code in _CALLER_CODES
    rpc_failed(error.code.value, error.message, callers_fault=callers_fault)
    level = logging.DEBUG if callers_fault else logging.WARNING
    log.log(
        level,
        "rpc failed",
        extra={"rpc": method, "code": error.code.value, "error": error.message},
    )
    return error


class ErrorInterceptor:
    """Turns every exception of a handler into the Connect error the client should see;
    `adapt`, when given, first replaces an exception with the one to send instead (E2B's
    envd answers some of Corral's errors with other codes)."""

    def __init__(self, adapt: Callable[[Exception], Exception] | None = None) -> None:
        self._adapt = adapt

    def _error(self, exc: Exception, ctx: RequestContext[Any, Any]) -> ConnectError:
        return _translate(exc if self._adapt is None else self._adapt(exc), ctx)

    async def intercept_unary(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], Awaitable[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise self._error(exc, ctx) from None

    async def intercept_client_stream(
        self,
        call_next: Callable[[AsyncIterator[REQ], RequestContext[Any, Any]], Awaitable[RES]],
        request: AsyncIterator[REQ],
        ctx: RequestContext[Any, Any],
    ) -> RES:
        try:
            return await call_next(request, ctx)
        except Exception as exc:
            raise self._error(exc, ctx) from None

    async def intercept_server_stream(
        self,
        call_next: Callable[[REQ, RequestContext[Any, Any]], AsyncIterator[RES]],
        request: REQ,
        ctx: RequestContext[Any, Any],
    ) -> AsyncIterator[RES]:
        stream = call_next(request, ctx)
        try:
            async for message in stream:
                yield message
        except Exception as exc:
            raise self._error(exc, ctx) from None
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
