"""The official `e2b` SDK against one real Corral server per session.

The server is started by corral_server.py (shared with scripts/e2b_conformance.py and
benchmarks/e2b.py); the SDK finds it through E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY,
set in os.environ for the whole session, exactly as a user would set them. The session
runs in a network namespace of its own with loopback only (corral_server.isolate_network).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from corral_server import CorralServer, isolate_network, start
from e2b import AsyncSandbox, Sandbox

# The template every E2B test creates its sandboxes from (E2B's default).
TEMPLATE = "base"
# Seconds a test's sandbox lives at most, should its test die before killing it.
SANDBOX_TIMEOUT = 300


def pytest_configure(config: pytest.Config) -> None:
    # Before any thread or socket: the whole session, server and sandboxes included, runs
    # in a network namespace with loopback only.
    isolate_network()


# Started at session start, not in a fixture: its `base` template takes a minute to build
# on a loaded machine, which no test's timeout should be charged with.
_server: CorralServer | None = None
_saved_env: dict[str, str | None] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    global _server
    _server = start()
    _saved_env.update({name: os.environ.get(name) for name in _server.e2b_env})
    os.environ.update(_server.e2b_env)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _server is not None:
        _server.stop()
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def corral() -> CorralServer:
    """The session's server; the SDK's environment points at it."""
    assert _server is not None
    return _server


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A running sandbox of `base` (sync SDK), killed after the test."""
    box = Sandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT)
    try:
        yield box
    finally:
        box.kill()


@pytest_asyncio.fixture
async def async_sandbox() -> AsyncIterator[AsyncSandbox]:
    """A running sandbox of `base` (async SDK), killed after the test."""
    box = await AsyncSandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT)
    try:
        yield box
    finally:
        await box.kill()
