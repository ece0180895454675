"""A Debian base template end to end, offline: mmdebstrap bootstraps a root filesystem from
the local archive (`make setup` made it) inside a network namespace with no interface but
loopback, the layer store imports it, and a program of the base runs on the overlay of it,
its writes landing in the upper dir only."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.images import LayerStore, mount_overlay, unmount_overlay

ARCHIVE = Path(__file__).resolve().parent.parent / ".cache" / "debian"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap's root mode and mounts need root"),
    pytest.mark.skipif(
        not (ARCHIVE / "Release").is_file(),
        reason=f"no local Debian archive in {ARCHIVE}: run `make setup` as root once",
    ),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap: make setup"),
]


def suite() -> str:
    for line in (ARCHIVE / "Release").read_text().splitlines():
        if line.startswith("Codename:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{ARCHIVE}/Release names no codename")


@pytest.mark.timeout(600)
def test_bootstrap_offline_import_and_run_on_an_overlay(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    # unshare --net: the bootstrap cannot reach any network, so it must use the local
    # archive only (copy:// because the chroot cannot see the host's paths).
    subprocess.run(
        [
            "unshare", "--net", "mmdebstrap", "--quiet", "--mode=root", "--variant=apt",
            "--include=python3-minimal", suite(), str(rootfs),
            f"deb [trusted=yes] copy://{ARCHIVE} ./",
        ],
        stdin=subprocess.DEVNULL,
        check=True,
        timeout=540,
    )  # fmt: skip
    assert (rootfs / "usr" / "bin" / "python3").exists()

    store = LayerStore(tmp_path / "store")
    layer = store.import_dir(rootfs)
    assert layer.size_bytes > 50 << 20
    assert "dev/null: device node dropped" in layer.neutralised
    assert any(line.endswith("setuid/setgid bits cleared") for line in layer.neutralised)
    assert not (layer.path / "dev" / "null").exists()

    upper, work, root = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    for path in (upper, work, root):
        path.mkdir()
    mount_overlay([layer.path], upper, work, root)
    try:
        ran = subprocess.run(
            [
                "unshare", "--net", "chroot", str(root), "/usr/bin/python3", "-c",
                "import sys; open('/etc/written', 'w').write('x'); print(sys.version_info[0])",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )  # fmt: skip
    finally:
        unmount_overlay(root)
    assert ran.stdout.strip() == "3"
    assert (upper / "etc" / "written").read_text() == "x"
    assert not (layer.path / "etc" / "written").exists()
