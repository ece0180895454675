"""Layer GC (`LayerStore.collect`): layers that are kept, held or new survive, the others
go; an import racing a collection never loses its layer."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from corral.errors import InvalidRequest
from corral.images import Layer, LayerStore


def _layer(store: LayerStore, text: str) -> Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("file")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text.encode()))
    raw.seek(0)
    return store.import_tar(raw)


def _age(store: LayerStore, layer: Layer, seconds: float) -> None:
    """Make the layer look stored `seconds` ago."""
    then = time.time() - seconds
    os.utime(layer.path.with_suffix(".json"), (then, then))


def test_collect_removes_only_layers_nothing_keeps_holds_or_just_stored(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    kept, held, orphan, young = (_layer(store, name) for name in ("k", "h", "o", "y"))
    for layer in (kept, held, orphan):
        _age(store, layer, 3600)
    store.reference(held.digest, "template.held")
    removed = store.collect({kept.digest}, min_age=600)
    assert removed == [orphan.digest]
    assert {layer.digest for layer in store.layers()} == {kept.digest, held.digest, young.digest}
    assert not orphan.path.exists()
    assert list((store.root / "staging").iterdir()) == []
    # Released and old enough: the next collection takes it.
    store.release(held.digest, "template.held")
    assert store.collect({kept.digest}, min_age=0) == sorted([held.digest, young.digest])
    assert [layer.digest for layer in store.layers()] == [kept.digest]


def test_importing_stored_content_again_protects_it_from_the_next_collection(
    tmp_path: Path,
) -> None:
    """An import's caller gets the layer before it can reference it: a layer imported
    again (deduplicated) is new again for the grace period."""
    store = LayerStore(tmp_path / "store")
    first = _layer(store, "same")
    _age(store, first, 3600)
    again = _layer(store, "same")
    assert again.digest == first.digest
    assert store.collect(set(), min_age=600) == []
    assert store.get(first.digest).path.is_dir()


def test_collect_racing_imports_loses_no_imported_layer(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    imported: list[Layer] = []
    stop = threading.Event()

    def importer() -> None:
        for i in range(40):
            imported.append(_layer(store, f"content {i % 5}"))
        stop.set()

    thread = threading.Thread(target=importer)
    thread.start()
    while not stop.is_set():
        store.collect(set(), min_age=60)
    thread.join()
    for layer in imported:
        assert store.get(layer.digest).path.is_dir()


def test_collect_refuses_a_malformed_digest_to_keep(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "store")
    layer = _layer(store, "x")
    _age(store, layer, 3600)
    with pytest.raises(InvalidRequest, match="not a layer digest"):
        store.collect({"sha256:nope"}, min_age=0)
    assert store.get(layer.digest).path.is_dir()  # nothing removed
