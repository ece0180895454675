"""Doing one thing inside another network namespace, from the host's process.

A socket belongs to the network namespace of the thread that created it, for life: a
socket made inside a sandbox's namespace and then served from the host's event loop is
the sandbox's (its resolver at 127.0.0.53 there) while everything else the loop does stays
the host's. Python 3.11 has no `os.setns`, so this calls libc's through ctypes. The switch
is per thread, so it happens in a fresh thread that ends with the call: no thread of a
pool (the event loop's executor, say) is ever left in a sandbox's namespace.

Entering a namespace needs CAP_SYS_ADMIN over it and in the caller's own user namespace:
the server as root can; a rootless server cannot (and, being multithreaded, may not join
the user namespace that owns it either), so there the namespace's holder makes the
sockets and passes them back (`corral.isolation.nsholder`).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(netns_path: str) -> None:
    """Move the calling thread (only it) into the network namespace at `netns_path` (a
    /run/netns/NAME or /proc/PID/ns/net file)."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns_path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns_path: str, function: Callable[[], T]) -> T:
    """`function()` called in a new thread inside the namespace at `netns_path`; its result
    (sockets it made stay in that namespace), or its exception. Blocks until it returns."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            enter_netns(netns_path)
            outcome.append(function())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="corral-setns", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


async def run_in_netns(netns_path: str, function: Callable[[], T]) -> T:
    """`call_in_netns` without blocking the event loop: a pool thread waits for the new
    one (the pool thread itself never changes namespace)."""
    return await asyncio.to_thread(call_in_netns, netns_path, function)
