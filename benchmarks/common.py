"""What the benchmark scripts share that needs nothing of Corral's: a free port, waiting
for a server to answer, printing the report, the database a run's server uses.

No `corral` import here (the PostgreSQL cluster's helper is imported only when one is
asked for), so that bomb.py can measure another checkout's server with it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_answering(url: str, process: subprocess.Popen[Any], what: str, timeout: float) -> None:
    """Until `url`/healthz answers 200; exits saying `what` did not start if `process`
    ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """One JSON object on a line with --json, else indented for a reader."""
    if as_json:
        print(json.dumps(report))
    else:
        json.dump(report, sys.stdout, indent=2)
        print()


@contextmanager
def database(name: str) -> Iterator[str]:
    """The store's URL: "" (SQLite in the server's data dir), or a PostgreSQL database on
    a cluster of its own for the run, reached over its Unix socket (as a server on the
    database's own host would)."""
    if name == "sqlite":
        yield ""
        return
    from tests.kit import postgres

    if reason := postgres.unavailable():
        raise SystemExit(f"--database postgresql: {reason}")
    cluster = postgres.start()
    try:
        yield cluster.url(postgres.MIGRATED, unix=True)
    finally:
        cluster.destroy()
