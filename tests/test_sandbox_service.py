"""The sandbox service is the only door to a live sandbox; the engine keeps its own books.

Real namespace sandboxes, a real engine and a real SQLite store: no mocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from corral.config import Settings
from corral.isolation import Engine
from corral.sandboxes import SandboxManager
from corral.store import Store
from tests.conftest import require_backend

pytestmark = pytest.mark.sandbox


@pytest.fixture
async def manager(
    settings: Settings, store: Store, engine: Engine
) -> AsyncIterator[SandboxManager]:
    require_backend(settings, "namespace")
    manager = SandboxManager(settings, store, engine=engine, pool_size=0)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.aclose()


# -- the engine's bookkeeping ---------------------------------------------------------------


async def test_engine_sandboxes_is_read_only_and_forgets_a_destroyed_sandbox(
    engine: Engine, settings: Settings
) -> None:
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace")
    try:
        assert engine.sandboxes[box.id] is box
        with pytest.raises(TypeError):  # only the engine changes its books
            engine.sandboxes[box.id] = box  # type: ignore[index]
        with pytest.raises(AttributeError):
            engine.sandboxes.pop(box.id)  # type: ignore[attr-defined]
    finally:
        await box.destroy()
    # Whoever destroys it, the engine no longer counts it: no one pops it by hand.
    assert box.id not in engine.sandboxes and len(engine.sandboxes) == 0
