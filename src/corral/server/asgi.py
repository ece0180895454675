"""The app as a server process loads it by name: `corral.server.asgi:app`.

pyvoy runs the app inside Envoy's process, which imports it; `corral server` passes its
settings there as CORRAL_* variables (`Settings.to_env`), so this module reads only those.

`app` loads the real one (`CorralApp`, seconds of imports on a busy machine) on its first
call, the lifespan's start-up, in a thread: Envoy imports this module while it loads its
configuration, before its admin API answers, and pyvoy gives that only 10 seconds.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from corral import logs
from corral.config import Settings
from corral.server.envoy import INHERITED, SUPERVISOR

if TYPE_CHECKING:
    from corral.server.app import ASGIApp, Scope, Send
    from corral.server.disconnect import Receive


def _restore_environment() -> None:
    """Put back the variables pyvoy changed for Envoy (`corral.server.envoy`)."""
    inherited = os.environ.pop(INHERITED, None)
    if inherited is None:  # not started by `corral server`
        return
    for name, value in json.loads(inherited).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _die_with_supervisor() -> None:
    """Envoy (and so the app and its sandboxes) dies with `corral server`, even when that
    is killed outright: nothing else would stop an orphaned Envoy."""
    supervisor = os.environ.pop(SUPERVISOR, None)
    if supervisor is None:
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(supervisor):  # it died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


_PR_SET_PDEATHSIG = 1
_restore_environment()
_die_with_supervisor()


def _load() -> ASGIApp:
    from corral.server.app import CorralApp

    return CorralApp(_settings)


class _LoadedOnFirstCall:
    def __init__(self) -> None:
        self._loading: asyncio.Task[ASGIApp] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(_load))
        loaded = await asyncio.shield(self._loading)
        await loaded(scope, receive, send)


class _CancelledReceive(logging.Filter):
    """Drops asyncio's error record for pyvoy's (1.3) bug: once a response is complete it
    sets the result of a `receive()` that connectrpc has cancelled meanwhile, and asyncio
    logs the InvalidStateError, on nearly every request. Nothing is lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(error, asyncio.InvalidStateError)
            and "RecvFutureExecutor" in record.getMessage()
        )


_settings = Settings.from_env()
logs.configure(_settings.log_level)
logging.getLogger("asyncio").addFilter(_CancelledReceive())
app: Any = _LoadedOnFirstCall()
