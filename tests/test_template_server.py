"""Templates through a real `corral server`: its start registers the ready templates of its
store (a restart serves them again), a sandbox created with `template=NAME` starts from
the caller's team's template, and another team's name is not found."""

from __future__ import annotations

import asyncio

import pytest

from corral import Sandbox
from corral.config import Settings
from corral.errors import NotFound
from corral.images import LayerStore
from corral.isolation import Engine
from corral.store import Store
from corral.templates import TemplateCatalog
from tests.conftest import opts, start_server
from tests.kit.debian import base_layer, needs_archive

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]


def add_template(settings: Settings, name: str) -> None:
    """What a finished build leaves (a ready row, its layers stored), made while no server
    runs: only the store and the layer store know it."""
    store = Store.open(settings)
    try:
        team = store.team("default")
        layer = base_layer(LayerStore(settings.data_dir / "templates"), ["python3"])
        engine = Engine(settings)
        try:
            catalog = TemplateCatalog(settings, store, engine)
            catalog.add_layers(team.id, name, [layer.digest], source="debian", env={"K": "v"})
        finally:
            asyncio.run(engine.aclose())
    finally:
        store.close()


def test_a_restarted_server_serves_its_teams_templates(own_runtime: Settings) -> None:
    data = own_runtime.data_dir
    server = start_server(own_runtime, data, pool_size=0)
    server.stop()
    add_template(own_runtime.with_(data_dir=data), "base")
    server = start_server(own_runtime, data, pool_size=0)
    try:
        with Sandbox.create("base", timeout=120, **opts(server)) as sbx:
            ran = sbx.commands.run(". /etc/os-release; echo $ID $K")
            assert ran.stdout.split() == ["debian", "v"]
        other_key = server.new_team("others")
        with pytest.raises(NotFound, match="no template 'base'"):
            Sandbox.create("base", server=server.url, api_key=other_key)
        # The CLI: a name the team lacks is not found (exit 4), in one line.
        done = server.corral("run", "--template", "nope", "--", "true")
        assert done.returncode == 4 and "no template 'nope'" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    finally:
        server.stop()
