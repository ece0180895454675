"""OCI images into the layer store: images built here (a layout written by hand, archives
and registry pushes made from it with skopeo), pulled by every transport from files and
from Debian's docker-registry on a loopback port; whiteouts; hostile layers and images."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.errors import ImagePullFailed, InvalidImage, InvalidLayer, InvalidRequest, QuotaExceeded
from corral.images import LayerStore, mount_overlay, oci, unmount_overlay
from tests.kit import rootless
from tests.kit.debian import deb
from tests.kit.oci_images import (
    HAVE_REGISTRY,
    Registry,
    base_layer,
    busybox_rootfs,
    directory,
    layer,
    member,
    skopeo_copy,
    start_registry,
    tar_tree,
    top_layer,
    write_layout,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts as trusted xattrs need root"),
    pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is missing: make setup"),
]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    if not HAVE_REGISTRY:
        pytest.skip("docker-registry is missing: make setup")
    with start_registry(tmp_path, None) as running:
        yield running


@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[Registry]:
    if not HAVE_REGISTRY:
        pytest.skip("docker-registry is missing: make setup")
    with start_registry(tmp_path, ("corral", "s3cret-pass")) as running:
        yield running


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "store")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return write_layout(tmp_path / "image", [base_layer(), top_layer()])


def staging_of(store: LayerStore) -> list[str]:
    return os.listdir(store.root / "staging")


# -- pulls --------------------------------------------------------------------------------


def test_a_layout_pulls_as_one_stored_layer_per_image_layer(
    store: LayerStore, image: Path, tmp_path: Path
) -> None:
    pulled = oci.pull(f"oci:{image}:1", store)
    assert pulled.config == oci.ImageConfig(
        env=("PATH=/usr/bin:/bin", "GREETING=hello"),
        working_dir="/srv",
        user="1000:1000",
        entrypoint=("/usr/bin/hello",),
        cmd=("--loud",),
        labels={"org.example.team": "corral"},
    )
    assert len(pulled.layers) == 2 and pulled.digest.startswith("sha256:")
    base, top = (store.get(digest).path for digest in pulled.layers)

    hello = base / "usr/bin/hello"
    assert hello.read_text() == "#!/bin/sh\necho hello\n"
    assert stat.S_IMODE(hello.stat().st_mode) == 0o755
    assert os.stat(base / "usr/bin/hello-again").st_ino == hello.stat().st_ino
    assert os.readlink(base / "usr/bin/hi") == "hello"
    assert os.readlink(base / "bin") == "/usr/bin"  # kept verbatim, never followed
    assert stat.S_IMODE((base / "srv").stat().st_mode) == 0o750

    # The importer's own whiteouts: a char 0/0 device and the opaque xattr.
    gone = os.lstat(top / "etc/obsolete")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert not (top / "etc/.wh.obsolete").exists()
    assert os.getxattr(top / "var/cache", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(top / "var/cache")) == ["new"]
    # Making them kept the archive's directory times: the digest does not depend on "now".
    assert os.stat(top / "etc").st_mtime == os.stat(top / "var/cache").st_mtime == 1_700_000_000

    # Stacked as overlay lower dirs, they show the image's filesystem.
    upper, work, root = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    for path in (upper, work, root):
        path.mkdir()
    mount_overlay([base, top], upper, work, root)
    try:
        assert not (root / "etc/obsolete").exists()
        assert (root / "etc/motd").read_text() == "top\n"
        assert sorted(os.listdir(root / "var/cache")) == ["new"]
        assert (root / "usr/bin/hi").read_text().startswith("#!/bin/sh")
    finally:
        unmount_overlay(root)
    assert staging_of(store) == []


def test_every_transport_gives_the_same_layers(
    store: LayerStore, image: Path, tmp_path: Path, registry: Registry
) -> None:
    skopeo_copy(f"oci:{image}:1", f"oci-archive:{tmp_path / 'image.oci.tar'}")
    skopeo_copy(f"oci:{image}:1", f"docker-archive:{tmp_path / 'image.docker.tar'}:corral/t:1")
    pushed = registry.push(image, "corral/test:1")

    first = oci.pull(f"oci:{image}:1", store)
    for reference in (
        f"oci-archive:{tmp_path / 'image.oci.tar'}",
        f"docker-archive:{tmp_path / 'image.docker.tar'}",  # uncompressed layers
        pushed,
    ):
        again = oci.pull(reference, store)
        assert again.layers == first.layers, reference
        assert again.config == first.config, reference
    # Content addressed: four imports of the same two layers are two layers.
    assert sorted(layer.digest for layer in store.layers()) == sorted(first.layers)
    assert staging_of(store) == []


def test_a_shared_base_layer_is_stored_once(store: LayerStore, tmp_path: Path) -> None:
    one = oci.pull(f"oci:{write_layout(tmp_path / 'one', [base_layer()])}:1", store)
    two = oci.pull(f"oci:{write_layout(tmp_path / 'two', [base_layer(), top_layer()])}:1", store)
    assert two.layers[0] == one.layers[0]
    assert len(store.layers()) == 2


def test_a_registry_with_basic_auth(
    store: LayerStore, image: Path, private_registry: Registry
) -> None:
    reference = private_registry.push(image, "corral/private:1")
    with pytest.raises(ImagePullFailed, match="skopeo could not fetch"):
        oci.pull(reference, store)
    with pytest.raises(ImagePullFailed):
        oci.pull(reference, store, auth=("corral", "wrong"))
    assert store.layers() == [] and staging_of(store) == []

    pulled = oci.pull(reference, store, auth=("corral", "s3cret-pass"))
    assert len(pulled.layers) == 2 and pulled.config.cmd == ("--loud",)
    assert staging_of(store) == []


def test_a_missing_image_in_the_registry_is_refused(store: LayerStore, registry: Registry) -> None:
    with pytest.raises(ImagePullFailed):
        oci.pull(f"docker://{registry.host}/corral/nothing:1", store)
    assert store.layers() == [] and staging_of(store) == []


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        ("dir:/tmp", "not an image Corral imports"),
        ("docker-daemon:x:1", "not an image Corral imports"),
        ("docker://debian:12", "names no registry host"),
        ("oci:/no/such/layout", "does not exist"),
        ("--src-creds=a:b", "not an image Corral imports"),
        ("oci:/tmp\n", "not an image reference"),
    ],
)
def test_bad_references_are_refused(store: LayerStore, reference: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        oci.pull(reference, store)
    assert staging_of(store) == []


def test_bad_platform_and_credentials_for_a_file_are_refused(
    store: LayerStore, image: Path
) -> None:
    with pytest.raises(InvalidRequest, match="OS/ARCH"):
        oci.pull(f"oci:{image}:1", store, platform="linux;amd64")
    with pytest.raises(InvalidRequest, match="takes no credentials"):
        oci.pull(f"oci:{image}:1", store, auth=("a", "b"))
    assert store.layers() == [] and staging_of(store) == []


# -- hostile images -----------------------------------------------------------------------


def test_a_layer_climbing_out_is_refused(store: LayerStore, tmp_path: Path) -> None:
    evil = layer(member("../../escaped", b"x"))
    image = write_layout(tmp_path / "image", [base_layer(), evil])
    with pytest.raises(InvalidLayer, match=r"layer 2 .*climbs out"):
        oci.pull(f"oci:{image}:1", store)
    assert not (tmp_path / "escaped").exists() and not (store.root / "escaped").exists()
    assert staging_of(store) == []


def test_absolute_symlinks_never_carry_writes_to_the_host(
    store: LayerStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    links = layer(member("evil", type=tarfile.SYMTYPE, linkname=str(outside)))
    through = layer(directory("evil"), member("evil/pwned", b"x"))
    pulled = oci.pull(f"oci:{write_layout(tmp_path / 'a', [links, through])}:1", store)
    lower, upper = (store.get(digest).path for digest in pulled.layers)
    assert os.readlink(lower / "evil") == str(outside)
    assert (upper / "evil" / "pwned").is_file() and not (upper / "evil").is_symlink()
    assert os.listdir(outside) == []

    same_layer = layer(
        member("evil", type=tarfile.SYMTYPE, linkname=str(outside)), member("evil/pwned", b"x")
    )
    with pytest.raises(InvalidLayer, match="not a directory"):
        oci.pull(f"oci:{write_layout(tmp_path / 'b', [same_layer])}:1", store)
    assert os.listdir(outside) == [] and staging_of(store) == []


def test_devices_setuid_and_forged_whiteouts_are_neutralised(
    store: LayerStore, tmp_path: Path
) -> None:
    hostile = layer(
        member("dev-sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
        member("forged-whiteout", type=tarfile.CHRTYPE, devmajor=0, devminor=0),
        member("su", b"\x7fELF", mode=0o4755),
        member(
            "opaque",
            type=tarfile.DIRTYPE,
            mode=0o755,
            pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"},
        ),
        member(".wh..wh.plnk", b""),  # AUFS metadata, not a whiteout
    )
    pulled = oci.pull(f"oci:{write_layout(tmp_path / 'image', [base_layer(), hostile])}:1", store)
    tree = store.get(pulled.layers[1]).path
    assert sorted(os.listdir(tree)) == ["opaque", "su"]
    assert stat.S_IMODE((tree / "su").stat().st_mode) == 0o755
    assert "trusted.overlay.opaque" not in os.listxattr(tree / "opaque")
    said = "\n".join(pulled.neutralised)
    for what in ("device node dropped", "setuid", "xattr trusted.overlay.opaque", "AUFS"):
        assert what in said


@pytest.mark.parametrize("name", ["etc/.wh.", "etc/.wh..wh..opq/x"])
def test_malformed_whiteouts_are_refused(store: LayerStore, tmp_path: Path, name: str) -> None:
    bad = layer(member(name, b""))
    with pytest.raises(InvalidLayer, match="whiteout"):
        oci.pull(f"oci:{write_layout(tmp_path / 'image', [bad])}:1", store)
    assert store.layers() == [] and staging_of(store) == []


def test_a_decompression_bomb_stops_at_the_quota(store: LayerStore, tmp_path: Path) -> None:
    bomb = layer(member("zeros", bytes(64 << 20)))
    assert len(bomb) < 1 << 20
    image = write_layout(tmp_path / "image", [bomb])
    with pytest.raises(QuotaExceeded, match="more than 8388608 bytes"):
        oci.pull(f"oci:{image}:1", store, max_bytes=8 << 20)
    assert store.layers() == [] and staging_of(store) == []


def test_the_quota_counts_every_layer(store: LayerStore, tmp_path: Path) -> None:
    three_mib = [layer(member(f"data{n}", os.urandom(3 << 20))) for n in range(2)]
    image = write_layout(tmp_path / "image", three_mib)
    with pytest.raises(QuotaExceeded, match="use a smaller image"):
        oci.pull(f"oci:{image}:1", store, max_bytes=5 << 20)
    assert staging_of(store) == []
    assert oci.pull(f"oci:{image}:1", store, max_bytes=7 << 20).size_bytes == 6 << 20


def test_a_manifest_naming_a_missing_blob_is_refused(store: LayerStore, image: Path) -> None:
    manifest = json.loads((image / "index.json").read_text())["manifests"][0]["digest"]
    blobs = image / "blobs" / "sha256"
    layer_digest = json.loads((blobs / manifest.split(":")[1]).read_text())["layers"][1]["digest"]
    (blobs / layer_digest.split(":")[1]).unlink()
    with pytest.raises(ImagePullFailed):
        oci.pull(f"oci:{image}:1", store)
    assert store.layers() == [] and staging_of(store) == []


def test_a_blob_that_does_not_match_its_digest_is_refused(store: LayerStore, image: Path) -> None:
    manifest = json.loads((image / "index.json").read_text())["manifests"][0]["digest"]
    blobs = image / "blobs" / "sha256"
    layer_digest = json.loads((blobs / manifest.split(":")[1]).read_text())["layers"][0]["digest"]
    tampered = layer(member("usr/bin/hello", b"#!/bin/sh\nrm -rf /\n", mode=0o755))
    (blobs / layer_digest.split(":")[1]).write_bytes(tampered)
    with pytest.raises(ImagePullFailed, match=r"[Dd]igest"):
        oci.pull(f"oci:{image}:1", store)
    assert store.layers() == [] and staging_of(store) == []


def test_the_importer_checks_digests_itself(store: LayerStore, image: Path) -> None:
    """skopeo verifies what it copies; the importer does not rely on it: a layout whose
    blob was changed after skopeo wrote it is refused by our own check."""
    manifest = json.loads((image / "index.json").read_text())["manifests"][0]["digest"]
    blobs = image / "blobs" / "sha256"
    layer_digest = json.loads((blobs / manifest.split(":")[1]).read_text())["layers"][0]["digest"]
    (blobs / layer_digest.split(":")[1]).write_bytes(layer(member("x", b"tampered")))
    with pytest.raises(InvalidImage, match="does not match its digest"):
        oci._import_layout(image, store, "test", None)
    (blobs / layer_digest.split(":")[1]).unlink()
    with pytest.raises(InvalidImage, match="which the image lacks"):
        oci._import_layout(image, store, "test", None)
    assert store.layers() == [] and staging_of(store) == []


@dataclass
class RecordingSkopeo:
    """skopeo first on PATH: records its argv and environment, then runs the real one (or,
    with `fail`, exits 1: for registries no test may reach)."""

    record: Path

    def calls(self) -> tuple[list[str], dict[str, str]]:
        argv, env = json.loads(self.record.read_text())
        return argv, env


@pytest.fixture
def recording_skopeo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordingSkopeo:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    record = tmp_path / "skopeo-call.json"
    (fake / "skopeo").write_text(
        "#!/usr/bin/python3\nimport json, os, sys\n"
        f"open({str(record)!r}, 'w').write(json.dumps([sys.argv, dict(os.environ)]))\n"
        f"if os.path.exists({str(tmp_path / 'fail')!r}): sys.exit(1)\n"
        f"os.execv({shutil.which('skopeo')!r}, ['skopeo', *sys.argv[1:]])\n"
    )
    (fake / "skopeo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    return RecordingSkopeo(record)


def test_registry_credentials_stay_off_the_command_line(
    store: LayerStore,
    image: Path,
    private_registry: Registry,
    recording_skopeo: RecordingSkopeo,
) -> None:
    """The authfile is how skopeo gets the password: what `ps` shows of skopeo never holds
    it, nor does its environment."""
    reference = private_registry.push(image, "corral/private:1")
    oci.pull(reference, store, auth=("corral", "s3cret-pass"))
    argv, env = recording_skopeo.calls()
    token = base64.b64encode(b"corral:s3cret-pass").decode()
    assert "--src-authfile" in argv and "--src-tls-verify=false" in argv
    assert not any("s3cret" in arg or token in arg for arg in [*argv, *env.values()])
    assert env["HOME"].startswith(str(store.root / "staging"))  # not the host user's config


def test_tls_is_verified_except_for_loopback_or_insecure(
    store: LayerStore, tmp_path: Path, recording_skopeo: RecordingSkopeo
) -> None:
    (tmp_path / "fail").touch()  # the fake stops before any traffic: no test leaves loopback
    for insecure in (False, True):
        with pytest.raises(ImagePullFailed):
            oci.pull("docker://registry.example.com/team/image:1", store, insecure=insecure)
        argv, _ = recording_skopeo.calls()
        assert ("--src-tls-verify=false" in argv) is insecure
        assert (
            argv[-1].startswith("oci:") and argv[-2] == "docker://registry.example.com/team/image:1"
        )
    for loopback in ("localhost:5000", "127.0.0.2:5000", "[::1]:5000"):
        with pytest.raises(ImagePullFailed):
            oci.pull(f"docker://{loopback}/team/image:1", store)
        assert "--src-tls-verify=false" in recording_skopeo.calls()[0]
    assert staging_of(store) == []


def test_an_image_for_another_platform_is_refused(store: LayerStore, tmp_path: Path) -> None:
    image = write_layout(tmp_path / "image", [base_layer()], arch="arm64")
    with pytest.raises(InvalidImage, match="built for linux/arm64, not linux/amd64"):
        oci.pull(f"oci:{image}:1", store)
    assert store.layers() == [] and staging_of(store) == []
    assert len(oci.pull(f"oci:{image}:1", store, platform="linux/arm64").layers) == 1


def test_zstd_layers_give_the_same_layers_as_gzip(
    store: LayerStore, image: Path, tmp_path: Path
) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("zstd is missing: make setup")
    zstd_image = tmp_path / "zstd"
    skopeo_copy(
        f"oci:{image}:1", f"oci:{zstd_image}:1", "--dest-compress", "--dest-compress-format=zstd"
    )
    manifest = json.loads((zstd_image / "index.json").read_text())["manifests"][0]["digest"]
    layers = json.loads((zstd_image / "blobs/sha256" / manifest.split(":")[1]).read_text())
    assert {d["mediaType"] for d in layers["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }
    assert oci.pull(f"oci:{zstd_image}:1", store).layers == oci.pull(f"oci:{image}:1", store).layers
    assert len(store.layers()) == 2 and staging_of(store) == []


def test_a_zstd_bomb_stops_at_the_quota(store: LayerStore, tmp_path: Path) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("zstd is missing: make setup")
    bomb = write_layout(tmp_path / "bomb", [layer(member("zeros", bytes(64 << 20)))])
    skopeo_copy(
        f"oci:{bomb}:1",
        f"oci:{tmp_path / 'zstd'}:1",
        "--dest-compress-format=zstd",
        "--dest-compress",
    )
    with pytest.raises(QuotaExceeded, match="more than 8388608 bytes"):
        oci.pull(f"oci:{tmp_path / 'zstd'}:1", store, max_bytes=8 << 20)
    assert store.layers() == [] and staging_of(store) == []


def test_a_busybox_image_from_the_registry_runs_on_its_layers(
    store: LayerStore, tmp_path: Path, registry: Registry
) -> None:
    """Debian's busybox-static as a two-layer image (the second deletes a file), pushed to
    the loopback registry and pulled back: its shell runs on the overlay of its layers."""
    base = tar_tree(busybox_rootfs(deb("busybox-static"), tmp_path / "rootfs"))
    top = layer(directory("etc"), member("etc/.wh.motd"), member("etc/hostname", b"corral\n"))
    config = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin:/usr/bin"]}
    pushed = registry.push(write_layout(tmp_path / "image", [base, top], config), "corral/bb:1")

    pulled = oci.pull(pushed, store)
    assert pulled.config.cmd == ("/bin/sh",) and len(pulled.layers) == 2
    upper, work, root = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    for path in (upper, work, root):
        path.mkdir()
    mount_overlay([store.get(digest).path for digest in pulled.layers], upper, work, root)
    try:
        script = "cat /etc/hostname; ls /etc; echo written > /tmp/out"
        ran = subprocess.run(
            ["unshare", "--net", "chroot", str(root), "/bin/sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        unmount_overlay(root)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "corral\nhostname\n"
    assert (upper / "tmp" / "out").read_text() == "written\n"  # the layers stay unchanged


def test_a_registry_image_too_big_to_download_is_stopped(
    store: LayerStore, tmp_path: Path, registry: Registry
) -> None:
    """From a registry, `max_bytes` bounds the blobs skopeo downloads too: a registry
    cannot fill the host's disk before the unpack quota applies."""
    random = layer(member("random", os.urandom(6 << 20)))
    pushed = registry.push(write_layout(tmp_path / "image", [random]), "corral/big:1")
    with pytest.raises(QuotaExceeded, match="blobs are more than 4194304 bytes to download"):
        oci.pull(pushed, store, max_bytes=4 << 20)
    assert store.layers() == [] and staging_of(store) == []
    assert oci.pull(pushed, store, max_bytes=8 << 20).size_bytes == 6 << 20


PULL_AS_USER = """
import json, sys
from pathlib import Path
from corral.images import LayerStore, oci
store = LayerStore(Path(sys.argv[1]))
print(json.dumps([store.get(d).path.as_posix() for d in oci.pull(sys.argv[2], store).layers]))
"""


def test_rootless_whiteouts_are_user_xattrs_an_unprivileged_overlay_honours(
    tmp_path: Path,
) -> None:
    """Without root, the importer writes `user.overlay.opaque` (a rootless overlay mounts
    with `userxattr`) and char 0/0 whiteouts (any user may make those): an overlay that
    nobody mounts in its own user namespace shows the image's filesystem."""
    if rootless.missing():
        pytest.skip(f"missing {', '.join(rootless.missing())}")
    with rootless.home() as home:
        image = write_layout(home / "image", [base_layer(), top_layer()])
        subprocess.run(
            ["chown", "-R", f"{rootless.NOBODY}:{rootless.NOBODY}", str(image)], check=True
        )
        as_nobody = ["setpriv", f"--reuid={rootless.NOBODY}", f"--regid={rootless.NOBODY}"]
        as_nobody += ["--clear-groups"]
        pulled = subprocess.run(
            [*as_nobody, sys.executable, "-c", PULL_AS_USER, str(home / "data"), f"oci:{image}:1"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=home,
        )
        assert pulled.returncode == 0, pulled.stderr
        base, top = json.loads(pulled.stdout)
        assert os.getxattr(f"{top}/var/cache", "user.overlay.opaque") == b"y"
        assert "trusted.overlay.opaque" not in os.listxattr(f"{top}/var/cache")
        gone = os.lstat(f"{top}/etc/obsolete")
        assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0

        for part in ("upper", "work", "root"):
            (home / part).mkdir()
            os.chown(home / part, rootless.NOBODY, rootless.NOBODY)
        options = f"userxattr,lowerdir={top}:{base},upperdir={home}/upper,workdir={home}/work"
        root = home / "root"
        script = f"mount -t overlay -o {options} overlay {root} && ls {root}/var/cache"
        script += f" && cat {root}/etc/motd && ! test -e {root}/etc/obsolete"
        seen = subprocess.run(
            [*as_nobody, "unshare", "-Urm", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout == "new\ntop\n"
