"""The local Debian archive (`make setup` makes it: scripts/debian_archive.sh) and Debian
bases bootstrapped offline from it, cached.

A bootstrap takes 20-60 s on the 2 shared cores; importing a cached tar of it takes a few.
`base_layer(store, include)` bootstraps once per archive content and package list (the tar
is kept under .cache/rootfs/, keyed by both) and imports that tar into the given store."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from corral.images import Layer, LayerStore
from corral.images.debian import bootstrap

_CACHE = Path(__file__).resolve().parents[2] / ".cache"
# `make setup`'s; another one (a worktree's own, while the script's list changes) by name.
ARCHIVE = Path(os.environ.get("CORRAL_TEST_DEBIAN_ARCHIVE") or _CACHE / "debian")
MIRROR = f"deb [trusted=yes] copy://{ARCHIVE} ./"


def archive_packages() -> set[str]:
    packages = ARCHIVE / "Packages"
    if not packages.is_file():
        return set()
    return {
        line.split(":", 1)[1].strip()
        for line in packages.read_text().splitlines()
        if line.startswith("Package:")
    }


def suite() -> str:
    for line in (ARCHIVE / "Release").read_text().splitlines():
        if line.startswith("Codename:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{ARCHIVE}/Release names no codename")


def needs_archive(*packages: str) -> list[pytest.MarkDecorator]:
    """Marks that skip a test, with the reason, unless root with mmdebstrap and a local
    archive holding `packages`."""
    missing = sorted(set(packages) - archive_packages())
    return [
        pytest.mark.skipif(os.geteuid() != 0, reason="Debian bases need root (mmdebstrap)"),
        pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap: make setup"),
        pytest.mark.skipif(
            not (ARCHIVE / "Release").is_file() or bool(missing),
            reason=f"the local Debian archive {ARCHIVE} lacks {missing or 'a Release'}: "
            "run `make setup` as root",
        ),
    ]


def deb(package: str) -> Path:
    """The .deb of `package` in the local archive."""
    found = sorted((ARCHIVE / "pool").glob(f"{package}_*.deb"))
    if not found:
        pytest.skip(f"no {package} in {ARCHIVE}: run make setup as root")
    return found[-1]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one bootstrap per key, across processes
        yield


def base_tar(include: Sequence[str] = ("python3",), variant: str = "apt") -> Path:
    """A tar of the Debian base with `include`, bootstrapped offline once per archive
    content, variant and package list."""
    key = hashlib.sha256(
        (ARCHIVE / "Packages").read_bytes() + f"\0{variant}\0{sorted(include)}".encode()
    ).hexdigest()[:24]
    cached = _CACHE / "rootfs" / f"{suite()}-{variant}-{key}.tar"
    with _locked(cached.with_suffix(".lock")):
        if cached.is_file():
            return cached
        with tempfile.TemporaryDirectory(dir=cached.parent) as scratch:
            rootfs = Path(scratch) / "rootfs"
            bootstrap(suite(), rootfs, mirror=MIRROR, variant=variant, include=include)
            partial = Path(scratch) / "base.tar"
            with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(rootfs, arcname=".")
            partial.rename(cached)
        for old in cached.parent.glob(f"{suite()}-{variant}-*.tar"):
            if old != cached and old.stat().st_mtime < cached.stat().st_mtime - 7 * 86400:
                old.unlink(missing_ok=True)  # bases of archives long replaced
    return cached


def base_layer(store: LayerStore, include: Sequence[str] = ("python3",)) -> Layer:
    """The Debian base with `include` as a layer of `store` (from the cached tar)."""
    with open(base_tar(include), "rb") as stream:
        return store.import_tar(stream)
