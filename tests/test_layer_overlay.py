"""A sandbox's `/` from stored layers: a real overlay mount of real layers, writes landing
in the upper dir only, the layers never changed."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.images import LayerStore, mount_overlay, tree_digest, unmount_overlay

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting overlayfs on the host needs root"),
]


def layer_tar(files: dict[str, bytes]) -> io.BytesIO:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    raw.seek(0)
    return raw


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[LayerStore, Path, Path, list[Path]]]:
    store = LayerStore(tmp_path / "store")
    base = store.import_tar(layer_tar({"etc/os-release": b"ID=base\n", "etc/motd": b"base\n"}))
    top = store.import_tar(layer_tar({"etc/motd": b"top\n"}))
    upper, work, root = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    for path in (upper, work, root):
        path.mkdir()
    mount_overlay([base.path, top.path], upper, work, root)
    try:
        yield store, upper, root, [base.path, top.path]
    finally:
        unmount_overlay(root)


def test_writes_land_in_the_upper_dir_and_layers_stay_unchanged(
    mounted: tuple[LayerStore, Path, Path, list[Path]],
) -> None:
    store, upper, root, (base, top) = mounted
    digests = [layer.digest for layer in store.layers()]
    assert (root / "etc" / "os-release").read_text() == "ID=base\n"
    assert (root / "etc" / "motd").read_text() == "top\n"  # the later layer wins

    (root / "etc" / "motd").write_text("written in the sandbox\n")
    (root / "usr" / "local").mkdir(parents=True)
    (root / "usr" / "local" / "new").write_text("installed\n")
    (root / "etc" / "os-release").unlink()

    assert (upper / "etc" / "motd").read_text() == "written in the sandbox\n"
    assert (upper / "usr" / "local" / "new").read_text() == "installed\n"
    assert not (root / "etc" / "os-release").exists()
    # The deletion is a whiteout in the upper dir; both layers hold what they held.
    assert (base / "etc" / "os-release").read_text() == "ID=base\n"
    assert (top / "etc" / "motd").read_text() == "top\n"
    assert [layer.digest for layer in store.layers()] == digests
    assert sorted(tree_digest(path) for path in (base, top)) == sorted(digests)


def test_the_mount_is_nosuid_and_nodev(mounted: tuple[LayerStore, Path, Path, list[Path]]) -> None:
    _, _, root, _ = mounted
    options = next(
        line.split()[3]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1] == str(root)
    )
    assert {"nosuid", "nodev"} <= set(options.split(","))
