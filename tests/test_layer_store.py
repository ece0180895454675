"""The layer store: content addressing, what import keeps, and hostile archives refused or
neutralised with the host untouched (real tars, a real store on disk)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.errors import InvalidLayer, InvalidRequest, LayerInUse, QuotaExceeded, UnknownLayer
from corral.images import LayerStore, overlay_options, tree_digest

ROOT = os.geteuid() == 0


def make_tar(*members: tuple[tarfile.TarInfo, bytes | None], compress: bool = False) -> io.BytesIO:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    body = gzip.compress(raw.getvalue()) if compress else raw.getvalue()
    return io.BytesIO(body)


def entry(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o644 if kind != tarfile.DIRTYPE else 0o755
    info.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.fixture
def store(tmp_path: Path) -> LayerStore:
    return LayerStore(tmp_path / "store")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory a hostile layer aims at; it must stay empty."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


def assert_nothing_stored(store: LayerStore) -> None:
    assert store.layers() == []
    assert list((store.root / "staging").iterdir()) == []


def build_tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("ID=test\n")
    (root / "usr" / "bin").mkdir(parents=True)
    tool = root / "usr" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o755)
    os.link(tool, root / "usr" / "bin" / "tool-alias")
    (root / "bin").symlink_to("usr/bin")
    (root / "etc" / "tool").symlink_to("/usr/bin/tool")  # absolute: resolves in the sandbox
    os.mkfifo(root / "etc" / "pipe")
    os.setxattr(root / "etc" / "os-release", "user.origin", b"test")
    locked = root / "root"
    locked.mkdir(mode=0o700)
    os.utime(tool, (1_600_000_000, 1_600_000_000))


def test_import_dir_keeps_links_modes_xattrs_and_times(store: LayerStore, tmp_path: Path) -> None:
    source = tmp_path / "rootfs"
    build_tree(source)
    layer = store.import_dir(source)
    tree = layer.path
    assert (tree / "etc" / "os-release").read_text() == "ID=test\n"
    assert os.readlink(tree / "bin") == "usr/bin"
    assert os.readlink(tree / "etc" / "tool") == "/usr/bin/tool"
    tool, alias = (tree / "usr" / "bin" / "tool").stat(), (tree / "usr/bin/tool-alias").stat()
    assert (tool.st_ino, tool.st_nlink) == (alias.st_ino, 2)
    assert stat.S_IMODE(tool.st_mode) == 0o755 and tool.st_mtime == 1_600_000_000
    assert stat.S_ISFIFO((tree / "etc" / "pipe").lstat().st_mode)
    assert stat.S_IMODE((tree / "root").stat().st_mode) == 0o700
    assert os.getxattr(tree / "etc" / "os-release", "user.origin") == b"test"
    assert layer.neutralised == ()
    # Content-addressed: the digest is the stored tree's, and equals the source's.
    assert layer.digest == tree_digest(tree) == tree_digest(source)
    assert store.layers() == [layer]
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700


def test_same_content_in_another_order_and_compression_is_one_layer(store: LayerStore) -> None:
    a = (entry("etc", tarfile.DIRTYPE), None)
    b = (entry("etc/hostname"), b"box\n")
    c = (entry("etc/motd"), b"hello\n")
    first = store.import_tar(make_tar(a, b, c))
    second = store.import_tar(make_tar(a, c, b, compress=True))
    assert first == second
    assert len(store.layers()) == 1
    other = store.import_tar(make_tar(a, (entry("etc/hostname"), b"other\n")))
    assert other.digest != first.digest
    assert len(store.layers()) == 2


def test_directories_an_archive_does_not_list_do_not_make_the_digest_depend_on_time(
    tmp_path: Path,
) -> None:
    tar = make_tar((entry("usr/lib/python3/site.py"), b"pass\n")).getvalue()
    first = LayerStore(tmp_path / "one").import_tar(io.BytesIO(tar))
    time.sleep(1.1)  # a different second: mtimes are kept to the second
    second = LayerStore(tmp_path / "two").import_tar(io.BytesIO(tar))
    assert first.digest == second.digest
    for path in (first.path, first.path / "usr", first.path / "usr" / "lib"):
        st = path.stat()
        assert (st.st_mtime, stat.S_IMODE(st.st_mode)) == (0, 0o755)


@pytest.mark.skipif(not ROOT, reason="owners other than the importer's need root")
def test_owners_are_kept_as_root(store: LayerStore) -> None:
    layer = store.import_tar(make_tar((entry("home/user/file", uid=1234, gid=2345), b"x")))
    st = (layer.path / "home" / "user" / "file").stat()
    assert (st.st_uid, st.st_gid) == (1234, 2345)


def test_remove_refused_while_referenced(store: LayerStore) -> None:
    layer = store.import_tar(make_tar((entry("file"), b"x")))
    store.reference(layer.digest, "template-python")
    store.reference(layer.digest, "sbx_1")
    with pytest.raises(LayerInUse, match="sbx_1, template-python"):
        store.remove(layer.digest)
    assert (layer.path / "file").read_bytes() == b"x"  # nothing changed
    store.release(layer.digest, "sbx_1")
    store.release(layer.digest, "template-python")
    store.remove(layer.digest)
    assert not layer.path.exists()
    assert_nothing_stored(store)
    with pytest.raises(UnknownLayer, match="no stored layer"):
        store.get(layer.digest)
    with pytest.raises(InvalidRequest, match="sha256:<64 hex>"):
        store.remove("latest")
    with pytest.raises(UnknownLayer):
        store.reference(layer.digest, "sbx_2")


def test_bad_holder_name_refused(store: LayerStore) -> None:
    layer = store.import_tar(make_tar((entry("file"), b"x")))
    with pytest.raises(InvalidRequest, match="cannot name"):
        store.reference(layer.digest, "../../escape")
    assert store.holders(layer.digest) == []


# -- hostile archives ---------------------------------------------------------------------


def test_dotdot_path_refused(store: LayerStore, outside: Path) -> None:
    hostile = make_tar((entry("ok"), b"x"), (entry("../../outside/evil"), b"pwned"))
    with pytest.raises(InvalidLayer, match=r"climbs out of the layer with '\.\.'"):
        store.import_tar(hostile)
    assert_nothing_stored(store)
    assert list(outside.iterdir()) == []


def test_absolute_path_lands_inside_the_layer(store: LayerStore, outside: Path) -> None:
    layer = store.import_tar(make_tar((entry(f"{outside}/evil"), b"pwned")))
    assert list(outside.iterdir()) == []
    assert (layer.path / str(outside).lstrip("/") / "evil").read_bytes() == b"pwned"


def test_write_through_a_symlink_refused(store: LayerStore, outside: Path) -> None:
    for target in (str(outside), "../../../../../../../../" + str(outside)):
        hostile = make_tar(
            (entry("escape", tarfile.SYMTYPE, linkname=target), None),
            (entry("escape/evil"), b"pwned"),
        )
        with pytest.raises(InvalidLayer, match="a symlink cannot carry writes out"):
            store.import_tar(hostile)
        assert_nothing_stored(store)
        assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    "linkname",
    ["../../etc/passwd", "/etc/passwd", "nothing-before-it", "escape/passwd", "dir"],
)
def test_hard_link_out_of_the_layer_refused(store: LayerStore, linkname: str) -> None:
    before = os.stat("/etc/passwd").st_nlink
    hostile = make_tar(
        (entry("escape", tarfile.SYMTYPE, linkname="/etc"), None),
        (entry("dir", tarfile.DIRTYPE), None),
        (entry("stolen", tarfile.LNKTYPE, linkname=linkname), None),
    )
    with pytest.raises(InvalidLayer):
        store.import_tar(hostile)
    assert_nothing_stored(store)
    assert os.stat("/etc/passwd").st_nlink == before


def test_device_nodes_dropped_and_setuid_cleared(store: LayerStore) -> None:
    layer = store.import_tar(
        make_tar(
            (entry("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), None),
            (entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
            (entry("usr/bin/su", mode=0o4755), b"\x7fELF"),
            (entry("usr/bin/wall", mode=0o2755), b"\x7fELF"),
            (entry("tmp", tarfile.DIRTYPE, mode=0o1777), None),
        )
    )
    assert not (layer.path / "dev").exists()
    assert stat.S_IMODE((layer.path / "usr/bin/su").stat().st_mode) == 0o755
    assert stat.S_IMODE((layer.path / "usr/bin/wall").stat().st_mode) == 0o755
    assert stat.S_IMODE((layer.path / "tmp").stat().st_mode) == 0o1777  # sticky is fine
    assert layer.neutralised == (
        "dev/mem: device node dropped",
        "dev/sda: device node dropped",
        "usr/bin/su: setuid/setgid bits cleared",
        "usr/bin/wall: setuid/setgid bits cleared",
    )


def test_privileged_and_overlay_xattrs_dropped(store: LayerStore) -> None:
    info = entry("usr/bin/ping")
    info.pax_headers = {
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.user.overlay.redirect": "/etc",
        "SCHILY.xattr.user.mime_type": "application/x-executable",
    }
    layer = store.import_tar(make_tar((info, b"\x7fELF")))
    path = layer.path / "usr" / "bin" / "ping"
    assert os.listxattr(path) == ["user.mime_type"]
    assert sorted(layer.neutralised) == [
        "usr/bin/ping: xattr security.capability dropped",
        "usr/bin/ping: xattr trusted.overlay.opaque dropped",
        "usr/bin/ping: xattr user.overlay.redirect dropped",
    ]


def test_decompression_bomb_stops_at_the_bound(store: LayerStore) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = entry("zeros")
        info.size = 256 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert len(raw.getvalue()) < 1 << 20  # 256 MiB of file data in under 1 MiB
    raw.seek(0)
    with pytest.raises(QuotaExceeded, match="more than 8388608 bytes"):
        store.import_tar(raw, max_bytes=8 << 20)
    assert_nothing_stored(store)


@pytest.mark.parametrize(
    "hostile",
    [
        lambda: io.BytesIO(b"this is not a tar" * 100),
        lambda: make_tar((entry("etc", tarfile.DIRTYPE), None), (entry("etc"), b"x")),
        lambda: make_tar((entry("."), b"x")),
    ],
    ids=["not-a-tar", "file-replaces-dir", "file-as-root"],
)
def test_malformed_archives_refused(store: LayerStore, hostile: Callable[[], io.BytesIO]) -> None:
    with pytest.raises(InvalidLayer, match="the layer"):
        store.import_tar(hostile())
    assert_nothing_stored(store)


def test_import_dir_refuses_a_non_directory(store: LayerStore, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidRequest, match="not a directory"):
        store.import_dir(tmp_path / "file")
    assert_nothing_stored(store)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([], "at least one layer"),
        ([Path("relative")], "absolute path"),
        ([Path("/a,upperdir=/etc")], "without ','"),
        ([Path("/layers/" + "x" * 64)] * 80, "flatten the template"),
    ],
)
def test_bad_overlay_requests_are_refused(layers: list[Path], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        overlay_options(layers, Path("/upper"), Path("/work"))


def test_deep_trees_import_and_deeper_or_overlong_names_are_refused(store: LayerStore) -> None:
    deep = "/".join(["d"] * 500)
    layer = store.import_tar(make_tar((entry(f"{deep}/leaf"), b"x")))
    assert (layer.path / deep / "leaf").read_bytes() == b"x"
    assert tree_digest(layer.path) == layer.digest
    refused = {
        "x" * 300: "cannot be stored",  # one name past the kernel's 255
        "/".join(["y" * 200] * 16): "longer than 3072 bytes",
        "/".join(["z"] * 600): "nested 600 directories deep",
    }
    for name, message in refused.items():
        with pytest.raises(InvalidLayer, match=message):
            store.import_tar(make_tar((entry(name), b"x")))
    assert store.layers() == [layer]
    store.remove(layer.digest)  # a deep tree is removable too
    assert_nothing_stored(store)
