"""The server's `base` template (corral.templates.base) for tests, in seconds.

The base is bootstrapped offline from the local Debian archive once per archive content
and recipe (a tar under .cache/rootfs/, like tests/kit/debian.py's bases: 1-2 minutes
the first time) and imported once into a layer store beside it; then each server gets it
by `install(data_dir)` before it starts: that layer hard-linked into its store and
recorded as its base (about a second). Every E2B test
uses it; a server started by `tests.conftest.start_server` then serves `base` to every
team without building anything (its CORRAL_BASE_TEMPLATE is `off`: never from the
internet).
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from corral.images import Layer, LayerStore
from corral.templates import base
from tests.kit.debian import _CACHE, ARCHIVE, MIRROR, _locked, needs_archive, suite

if TYPE_CHECKING:
    from corral.config import Settings
    from tests.conftest import LiveServer


def needs_base() -> list[pytest.MarkDecorator]:
    """Marks that skip a test, with the reason, unless the base can be made here."""
    return needs_archive(*base.PACKAGES)


def base_tar() -> Path:
    """A tar of the base's root filesystem, made once per archive content and recipe."""
    recipe = inspect.getsource(base.make_rootfs) + inspect.getsource(base.customize)
    key = hashlib.sha256(
        (ARCHIVE / "Packages").read_bytes()
        + f"\0{base.RECIPE}\0{base.PACKAGES}\0{base.SUDO}\0{base.UMASK}\0{recipe}".encode()
    ).hexdigest()[:24]
    cached = _CACHE / "rootfs" / f"{suite()}-e2b-base-{key}.tar"
    with _locked(cached.with_suffix(".lock")):
        if cached.is_file():
            return cached
        with tempfile.TemporaryDirectory(dir=cached.parent) as scratch:
            rootfs = Path(scratch) / "rootfs"
            base.make_rootfs(suite(), rootfs, MIRROR)
            partial = Path(scratch) / "base.tar"
            with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(rootfs, arcname=".")
            partial.rename(cached)
        for old in cached.parent.glob(f"{suite()}-e2b-base-*"):
            if old.stem != cached.stem and old.stat().st_mtime < time.time() - 7 * 86400:
                # bases of archives or recipes long replaced: the tar, its store, its lock
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)
    return cached


def base_layer() -> Layer:
    """The base as a layer of a store kept beside its tar (imported once per tar)."""
    tar = base_tar()
    cache = LayerStore(tar.with_suffix(".store"))
    with _locked(tar.with_suffix(".lock")):
        digest_file = cache.root / "digest"
        if digest_file.is_file():
            return cache.get(digest_file.read_text())
        with open(tar, "rb") as stream:
            layer = cache.import_tar(stream)
        digest_file.write_text(layer.digest)
        return layer


def install(data_dir: Path) -> base.BaseRecord:
    """Give the server of `data_dir` its base (call it before the server starts, or the
    server finds it at the first create of `base`): the cached layer, hard-linked into
    its layer store (well under a second), and its record."""
    store = LayerStore(data_dir / "templates")
    layer = store.adopt(base_layer())
    return base.write_record(store, [layer.digest], suite())


@contextmanager
def server_with_base(settings: Settings, name: str) -> Iterator[LiveServer]:
    """A `corral server` (no warm pool) whose base is installed, data under `name`."""
    from tests.conftest import start_server

    data = settings.runtime_dir / name
    install(data)
    server = start_server(settings, data, pool_size=0)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    # `python -m tests.kit.e2b_base DATA_DIR`: a server's base for a process that cannot
    # import this kit (the tests/e2b_sdk environment), before it starts that server.
    import sys

    made = install(Path(sys.argv[1]))
    print(made.template_id)
