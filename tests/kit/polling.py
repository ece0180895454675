"""One polling helper: wait until a condition holds, else fail saying what never happened.

Tests wait on conditions, never on guessed sleeps: a loaded machine makes every guess
wrong sooner or later, and a wait on the condition is as fast as the system allows.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

TIMEOUT = 30.0
INTERVAL = 0.05


def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def wait_until(
    condition: Callable[[], T | None],
    what: str,
    *,
    timeout: float = TIMEOUT,
    interval: float = INTERVAL,
) -> T:
    """Call `condition` until it returns something true (not None, not false), and return
    that; fail with
    `what` (and the last value seen) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(interval)
    return value


@overload
async def until(
    condition: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    timeout: float = ...,
    interval: float = ...,
) -> T: ...


@overload
async def until(
    condition: Callable[[], T | None], what: str, *, timeout: float = ..., interval: float = ...
) -> T: ...


async def until(
    condition: Callable[[], Any], what: str, *, timeout: float = TIMEOUT, interval: float = INTERVAL
) -> Any:
    """`wait_until` for async tests: `condition` may be a plain or an async function, and
    the event loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(interval)
