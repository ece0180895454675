"""A template's start command and ready check at each sandbox's start
(`corral.sandboxes.startup`), on the Debian base: the command runs in the background as
the template's user, the ready check gates the start, and a check that never passes
fails it with its output (the API's side is in tests/test_templates_api.py)."""

from __future__ import annotations

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest, SandboxStartFailed
from corral.images import LayerStore
from corral.isolation import Engine
from corral.sandboxes import startup
from tests.conftest import require_backend
from tests.kit.debian import base_layer, needs_archive

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]


@pytest.fixture
def engine_with_base(engine: Engine, settings: Settings) -> tuple[Engine, LayerStore, str]:
    require_backend(settings, "namespace")
    store = LayerStore(settings.data_dir / "templates")
    return engine, store, base_layer(store).digest


async def test_the_start_command_runs_and_the_ready_check_gates_the_start(
    engine_with_base: tuple[Engine, LayerStore, str],
) -> None:
    engine, store, digest = engine_with_base
    engine.templates.add(
        "starting",
        store,
        [digest],
        user="user",
        start="sleep 0.5; id -un > /tmp/who; exec sleep 600",
        ready="test -s /tmp/who",
    )
    box = await engine.create(template="starting", isolation="namespace")
    try:
        await startup.start_template_command(box, {})
        # Ready only once the command had run: it waited for the half second.
        ran = await box.run(["cat", "/tmp/who"])
        assert ran.stdout == b"user\n"
        assert [p.tag for p in await box.processes()] == ["start"]
    finally:
        await box.destroy()


async def test_a_ready_check_that_never_passes_fails_with_its_output(
    engine_with_base: tuple[Engine, LayerStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, store, digest = engine_with_base
    monkeypatch.setattr(startup, "READY_TIMEOUT", 1.0)
    engine.templates.add(
        "never", store, [digest], start="exec sleep 600", ready="echo not yet >&2; exit 3"
    )
    box = await engine.create(template="never", isolation="namespace")
    try:
        with pytest.raises(SandboxStartFailed, match=r"ready check .* did not pass.*not yet"):
            await startup.start_template_command(box, {})
    finally:
        await box.destroy()


def test_an_empty_start_command_is_refused(
    engine_with_base: tuple[Engine, LayerStore, str],
) -> None:
    engine, store, digest = engine_with_base
    with pytest.raises(InvalidRequest, match="start command is empty"):
        engine.templates.add("empty", store, [digest], start="  ")
