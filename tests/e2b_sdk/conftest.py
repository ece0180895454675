"""The official `e2b` SDK against one real Corral server per session.

The server is started by corral_server.py (shared with scripts/e2b_conformance.py and
benchmarks/e2b.py); the SDK finds it through E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY,
set in os.environ for the whole session, exactly as a user would set them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from corral_server import CorralServer, running
from e2b import AsyncSandbox, Sandbox

# The template every E2B test creates its sandboxes from (E2B's default).
TEMPLATE = "base"
# Seconds a test's sandbox lives at most, should its test die before killing it.
SANDBOX_TIMEOUT = 300


@pytest.fixture(scope="session", autouse=True)
def corral() -> Iterator[CorralServer]:
    """The session's server, with the SDK's environment pointing at it."""
    with running() as server:
        saved = {name: os.environ.get(name) for name in server.e2b_env}
        os.environ.update(server.e2b_env)
        try:
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


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
