"""The server's `base` template (corral.templates.base) for tests, in seconds.

The base is bootstrapped offline from the local Debian archive once per archive content
and recipe (a tar under .cache/rootfs/, like tests/kit/debian.py's bases: 30-60 s the
first time), then each server gets it by `install(data_dir)` before it starts: the tar
imported into its layer store and recorded as its base (a few seconds). Every E2B test
uses it; a server started by `tests.conftest.start_server` then serves `base` to every
team without building anything (its CORRAL_BASE_TEMPLATE is `off`: never from the
internet).
"""

from __future__ import annotations

import hashlib
import inspect
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from corral.images import LayerStore
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
    return cached


def install(data_dir: Path) -> base.BaseRecord:
    """Give the server of `data_dir` its base (call it before the server starts, or the
    server finds it at the first create of `base`)."""
    store = LayerStore(data_dir / "templates")
    with open(base_tar(), "rb") as stream:
        layer = store.import_tar(stream)
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
