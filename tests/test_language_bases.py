"""Language bases (`corral.images.languages`): each bootstraps offline from the local
archive (tests/kit/debian.py) and runs its hello world in a sandbox of it."""

from __future__ import annotations

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest
from corral.images import LayerStore
from corral.images.languages import LANGUAGES, language_base
from corral.isolation import Engine
from corral.limits import Limits
from tests.conftest import require_backend
from tests.kit.debian import base_layer, needs_archive


@pytest.mark.sandbox
@pytest.mark.timeout(600)  # a first bootstrap of each base: 20-90 s on the shared cores
@pytest.mark.parametrize(
    "language",
    [
        # python in `make test`; the others bootstrap 30-130 s each: `make test-slow`.
        pytest.param(
            name,
            marks=[
                *needs_archive(*base.packages),
                *([] if name == "python" else [pytest.mark.slow]),
            ],
        )
        for name, base in LANGUAGES.items()
    ],
)
async def test_a_language_base_runs_its_hello_world(
    engine: Engine, settings: Settings, language: str
) -> None:
    require_backend(settings, "namespace")
    base = language_base(language)
    store = LayerStore(settings.data_dir / "templates")
    layer = base_layer(store, base.packages)  # one cached tar per package set
    engine.templates.add(language, store, [layer.digest])
    box = await engine.create(
        template=language, isolation="namespace", limits=Limits(memory_mib=1024)
    )
    try:
        ran = await box.run(["sh", "-c", base.hello], cwd="/tmp", timeout=120)
    finally:
        await box.destroy()
    assert ran.exit_code == 0, ran.stderr.decode()
    assert ran.stdout.decode() == "hello\n"


def test_an_unknown_language_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(InvalidRequest, match="python, javascript, ruby, go"):
        language_base("cobol")
