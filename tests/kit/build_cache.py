"""Template builds carried from one test server to the next, so that a module whose server
runs once per database builds each template once, not once per database.

A server's build leaves its layers in the data dir's layer store and each step's cache key
(the Debian bootstrap's too) in its database (corral.templates.builder). A module saves
them once its shared template is built (`BuildCache.save`, in the fixture that builds it);
a server it starts next, on a data dir and database of its own, is given them before it
starts: the layers hard-linked (`LayerStore.adopt`: no copy, no digest) and their keys.
Its build of the same recipe then hits the cache at every step, as a second build on one
server would, and reports `cached` where the first said what it ran; what the tests build
after the save is built again, so they see their own steps run.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.config import Settings
from corral.images import LayerStore
from corral.store import Store
from tests.kit.debian import MIRROR

if TYPE_CHECKING:
    from tests.conftest import LiveServer


@dataclass
class BuildCache:
    """The builds a module saved from one server (`save`), for the next ones (`give`)."""

    # cache key -> the layer store holding its layer, and the layer's digest
    entries: dict[str, tuple[LayerStore, str]] = field(default_factory=dict)

    def save(self, server: LiveServer) -> None:
        """What `server` has built so far: its build cache (read while it runs)."""
        store = server.store()
        try:
            entries = dict(store.cache_entries())
        finally:
            store.close()
        layers = LayerStore(server.data_dir / "templates")
        self.entries.update({key: (layers, digest) for key, digest in entries.items()})

    def give(self, target: Settings) -> None:
        """What was saved, to the store of `target` before its server starts."""
        if not self.entries:
            return
        target.data_dir.mkdir(parents=True, exist_ok=True)
        layers = LayerStore(target.data_dir / "templates")
        store = Store.open(target)
        try:
            for key, (made, digest) in self.entries.items():
                layers.adopt(made.get(digest))
                store.cache_layer(key, digest)
        finally:
            store.close()


@contextmanager
def build_server(
    settings: Settings, name: str, database_url: str, cache: BuildCache
) -> Iterator[LiveServer]:
    """A server (no warm pool) that builds templates from the tests' local Debian archive,
    its data under `name`, its store at `database_url`, given what `cache` holds first."""
    from tests.conftest import start_server

    data = settings.runtime_dir / f"{name}-{secrets.token_hex(4)}"
    own = settings.with_(data_dir=data, database_url=database_url)
    cache.give(own)
    env = {"CORRAL_DEBIAN_MIRROR": MIRROR, "CORRAL_DATABASE_URL": database_url}
    live = start_server(settings, data, pool_size=0, extra_env=env)
    try:
        yield live
    finally:
        live.stop()
