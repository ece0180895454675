"""How the sync SDK runs the async one: a private event loop on a daemon thread.

The sync classes hold their async twins and forward each call through `run`, so there is
one implementation; `bridge` derives a sync method (signature, docstring) from an async
one. Callbacks such as `on_stdout` run on the portal's thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A")
W = TypeVar("W")

# Seconds the portal waits at exit for its HTTP transport's threads to go quiet.
_SETTLE = 0.05

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _portal_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="corral-sdk", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


@atexit.register
def _shutdown() -> None:
    """Stop the portal before the interpreter goes: finish or cancel what still runs on it.

    Left running, the loop's thread is frozen mid-call while the interpreter tears down the
    HTTP client under it, which can abort the process at exit.
    """
    with _lock:
        loop, thread = _loop, _thread
    if loop is None or thread is None or not thread.is_alive():
        return

    async def drain() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_asyncgens()
        # The RPC client's HTTP transport (pyqwest: Rust threads) reports results to this
        # loop from its own threads; one that does so while the interpreter finalizes
        # aborts the process. Closed, it has nothing left in flight.
        import pyqwest

        from corral.client._tls import aclose_transports

        await pyqwest.get_default_transport().aclose()
        await aclose_transports()
        # Requests cancelled above end on the transport's threads a moment later, each
        # reporting to this loop; one that reports once the interpreter is finalizing
        # takes a GIL that no longer exists and aborts the process (SIGABRT, 1 exit in
        # ~20 of tests/test_sdk_exit.py's script). Let them report now.
        await asyncio.sleep(_SETTLE)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    if not thread.is_alive():
        loop.close()


def run(coroutine: Coroutine[Any, Any, R]) -> R:
    """Run `coroutine` on the portal's loop and wait for it; Ctrl-C cancels it."""
    if threading.current_thread() is _thread:
        coroutine.close()
        raise RuntimeError(
            "a sync Corral call was made from an SDK callback; use the async API there"
        )
    future: Future[R] = asyncio.run_coroutine_threadsafe(coroutine, _portal_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


def bridge(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Any, P], R]:
    """The sync version of an async method, run on `self._async`."""

    def sync_method(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return run(method(self._async, *args, **kwargs))

    functools.update_wrapper(sync_method, method)
    return sync_method


def bridge_factory(
    function: Callable[P, Coroutine[Any, Any, A]], wrap: Callable[[A], W]
) -> Callable[P, W]:
    """The sync version of an async function (a classmethod, say), its result wrapped."""

    def sync_function(*args: P.args, **kwargs: P.kwargs) -> W:
        return wrap(run(function(*args, **kwargs)))

    functools.update_wrapper(sync_function, function)
    return sync_function
