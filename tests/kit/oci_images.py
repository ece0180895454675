"""OCI images built by hand for the import tests and benchmark: layer tars, an OCI image
layout written as the image spec describes it (index, manifest, config, blobs), skopeo
copies of it into archives and registries, and Debian's docker-registry on a loopback port
(with or without htpasswd basic auth)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.kit.polling import wait_until

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
CONFIG = {
    "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
    "WorkingDir": "/srv",
    "User": "1000:1000",
    "Entrypoint": ["/usr/bin/hello"],
    "Cmd": ["--loud"],
    "Labels": {"org.example.team": "corral"},
}


# -- building images ------------------------------------------------------------------------


def member(name: str, data: bytes = b"", **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    if info.type != tarfile.REGTYPE:
        info.size = 0
    return info, data


def directory(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, type=tarfile.DIRTYPE, mode=mode)


def layer(*members: tuple[tarfile.TarInfo, bytes], compress: bool = True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return gzip.compress(raw.getvalue(), mtime=0) if compress else raw.getvalue()


def write_layout(
    root: Path,
    layers: list[bytes],
    config: dict[str, Any] = CONFIG,
    arch: str = "amd64",
    diff_ids: list[str] | None = None,
) -> Path:
    """An OCI image layout, as the image spec describes it, tagged `1`; its config's
    `diff_ids` are the layers' own unless given (a lying image)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    diff_ids = diff_ids or [
        f"sha256:{hashlib.sha256(gzip.decompress(blob)).hexdigest()}" for blob in layers
    ]
    image_config = {
        "architecture": arch,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": put(
            json.dumps(image_config).encode(), "application/vnd.oci.image.config.v1+json"
        ),
        "layers": [put(blob, "application/vnd.oci.image.layer.v1.tar+gzip") for blob in layers],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                **put(json.dumps(manifest).encode(), MANIFEST),
                "annotations": {"org.opencontainers.image.ref.name": "1"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def base_layer() -> bytes:
    """A small root filesystem: files, directories, relative and absolute symlinks, a hard
    link, and what the next layer deletes."""
    return layer(
        directory("usr"),
        directory("usr/bin"),
        member("usr/bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755),
        member("usr/bin/hello-again", type=tarfile.LNKTYPE, linkname="usr/bin/hello"),
        member("usr/bin/hi", type=tarfile.SYMTYPE, linkname="hello"),
        member("bin", type=tarfile.SYMTYPE, linkname="/usr/bin"),
        directory("etc"),
        member("etc/motd", b"base\n"),
        member("etc/obsolete", b"deleted by the next layer\n"),
        directory("var"),
        directory("var/cache"),
        member("var/cache/a", b"a\n"),
        member("var/cache/b", b"b\n"),
        directory("srv", mode=0o750),
    )


def top_layer() -> bytes:
    """Deletes a file (whiteout), empties a directory (opaque) and changes a file."""
    return layer(
        directory("etc"),
        member("etc/.wh.obsolete"),
        member("etc/motd", b"top\n"),
        directory("var/cache"),
        member("var/cache/.wh..wh..opq"),
        member("var/cache/new", b"new\n"),
    )


def skopeo_copy(source: str, destination: str, *options: str) -> None:
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--quiet", *options, source, destination],
        check=True,
        capture_output=True,
        timeout=120,
    )


@dataclass
class Registry:
    host: str
    auth: tuple[str, str] | None

    def push(self, layout: Path, name: str) -> str:
        options = ["--dest-tls-verify=false"]
        if self.auth is not None:
            options.append("--dest-creds=" + ":".join(self.auth))
        skopeo_copy(f"oci:{layout}:1", f"docker://{self.host}/{name}", *options)
        return f"docker://{self.host}/{name}"


def tar_tree(root: Path) -> bytes:
    """The directory `root` as a gzipped layer tar (its entries relative to it)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".")
    return gzip.compress(raw.getvalue(), mtime=0)


@contextmanager
def start_registry(tmp_path: Path, auth: tuple[str, str] | None) -> Iterator[Registry]:
    """docker-registry serving from `tmp_path` on a free loopback port, until the end."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    if auth is not None:
        hashed = subprocess.run(
            ["htpasswd", "-Bbn", *auth], check=True, capture_output=True, text=True
        ).stdout
        (tmp_path / "htpasswd").write_text(hashed)
        config["auth"] = {"htpasswd": {"realm": "corral-test", "path": str(tmp_path / "htpasswd")}}
    # YAML is a superset of JSON: no YAML writer needed.
    (tmp_path / "registry.yml").write_text(json.dumps(config))
    log = (tmp_path / "registry.log").open("wb")
    process = subprocess.Popen(
        ["docker-registry", "serve", str(tmp_path / "registry.yml")], stdout=log, stderr=log
    )

    def answering() -> bool:
        assert process.poll() is None, (tmp_path / "registry.log").read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/v2/").status_code in (200, 401)
        except httpx.TransportError:
            return False

    try:
        wait_until(answering, "docker-registry to answer")
        yield Registry(f"127.0.0.1:{port}", auth)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


HAVE_REGISTRY = shutil.which("docker-registry") is not None


def busybox_rootfs(deb: Path, root: Path) -> Path:
    """A root filesystem of Debian's busybox-static: the .deb's files, the applets a shell
    script needs as symlinks, an /etc and a /tmp."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    binary = next(root.glob("*bin/busybox"))
    for applet in ("sh", "ls", "cat", "echo", "id"):
        (binary.parent / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("from busybox\n")
    (root / "tmp").mkdir(mode=0o1777)
    return root
