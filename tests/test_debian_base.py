"""A Debian base template end to end, offline: mmdebstrap bootstraps a root filesystem from
the local archive (`make setup` made it) inside a network namespace with no interface but
loopback, the layer store imports it, and a program of the base runs on the overlay of it,
its writes landing in the upper dir only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from corral.errors import InvalidRequest
from corral.images import LayerStore, mount_overlay, unmount_overlay
from corral.images.debian import bootstrap
from tests.kit.debian import MIRROR, needs_archive, suite

pytestmark = [pytest.mark.integration, *needs_archive("python3-minimal")]


@pytest.mark.timeout(600)
def test_bootstrap_offline_import_and_run_on_an_overlay(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    # A local mirror: bootstrap() runs mmdebstrap in a network namespace with loopback only,
    # so it must use the local archive only (copy:// because the chroot cannot see the
    # host's paths).
    bootstrap(suite(), rootfs, mirror=MIRROR, include=["python3-minimal"])
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


@pytest.mark.parametrize(
    ("suite_name", "include", "variant"),
    [("Bookworm", [], "apt"), ("bookworm", ["python3; rm -rf /"], "apt"), ("bookworm", [], "x")],
)
def test_bad_bootstrap_input_is_refused_before_mmdebstrap_runs(
    tmp_path: Path, suite_name: str, include: list[str], variant: str
) -> None:
    with pytest.raises(InvalidRequest):
        bootstrap(suite_name, tmp_path / "rootfs", mirror=MIRROR, include=include, variant=variant)
    assert not (tmp_path / "rootfs").exists()
