"""Processes the tests start, and the guarantee that none outlives the test that started it.

Every process a test spawns goes through `spawn`; conftest's autouse fixture calls
`reap_since` after each test, so a test that fails half-way (an assertion before its
`finally`, a follower still reading) leaks nothing into the next one. Processes that a
session- or module-scoped fixture starts are started before the test's mark and are left
to that fixture.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from typing import Any

_spawned: list[subprocess.Popen[Any]] = []


def spawn(argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(argv, **popen)`, remembered so that it is reaped."""
    process: subprocess.Popen[Any] = subprocess.Popen(list(argv), **popen)
    _spawned.append(process)
    return process


def mark() -> int:
    """Where the processes started from now on begin, for `reap_since`."""
    return len(_spawned)


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send `sig` (if it still runs), wait up to `timeout` seconds, then kill; its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def reap_since(start: int) -> list[list[str]]:
    """Stop every process spawned since `start` that still runs; the command lines of those
    that did (a test that leaves one running is told so by the caller)."""
    leaked = []
    for process in _spawned[start:]:
        if process.poll() is None:
            leaked.append([str(arg) for arg in process.args])  # type: ignore[union-attr]
            stop(process, timeout=10)
        for pipe in (process.stdin, process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    del _spawned[start:]
    return leaked


def proc_number(pid: int, file: str, field: str) -> int:
    """The number of `field` in /proc/<pid>/<file>: `status` (VmRSS, VmHWM: KiB) or `io`
    (wchar: bytes)."""
    with open(f"/proc/{pid}/{file}") as lines:
        for line in lines:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0])
    raise AssertionError(f"no {field} in /proc/{pid}/{file}")
