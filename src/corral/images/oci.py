"""OCI images into the layer store: from a registry, a docker-archive, an oci-archive or an
OCI layout.

skopeo fetches the image into an OCI layout in the store's staging directory (it speaks
the registries' protocol, auth and platform choice; it verifies what it copies); then our
own importer reads that layout: every JSON and blob is checked against its digest again,
and each layer blob is unpacked through `LayerStore.import_tar`'s checks, one stored layer
per image layer (content addressed: a base layer two images share is stored once).

OCI whiteouts become overlayfs ones after those checks, made here and never taken from
the archive (the unpacker drops device nodes and `*.overlay.*` xattrs): `DIR/.wh.NAME` is
replaced by a char 0/0 device `DIR/NAME`, `DIR/.wh..wh..opq` by the `overlay.opaque` xattr
on DIR, so the stored layers stack as overlay lower dirs exactly as the image's layers do.
`oci_whiteouts` is the way back, for a sandbox's upper dir on its way to a layer (a
snapshot): its overlay whiteouts leave as `.wh.` entries and come back through the same
checks and `overlay_whiteouts`.

A layer's `diff_id` (sha256 of its uncompressed tar) is computed while it is imported and
recorded in the store: pulling an image again skips unpacking a layer already stored,
once its blob is seen to hold that tar.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import ipaddress
import json
import os
import re
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from corral.errors import ImagePullFailed, InvalidImage, InvalidLayer, InvalidRequest, QuotaExceeded
from corral.images._archive import Unpacked
from corral.images._store import _DIGEST, Layer, LayerStore

__all__ = [
    "LOCAL_TRANSPORTS",
    "Image",
    "ImageConfig",
    "oci_whiteouts",
    "overlay_whiteouts",
    "pull",
    "registry_host",
]

LOCAL_TRANSPORTS = ("docker-archive:", "oci-archive:", "oci:")
# A repository path, tag and digest as Docker's reference grammar spells them (what
# follows the registry host in `FROM docker.io/library/python:3.12-slim`).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOCKER_NAME = re.compile(
    rf"{_COMPONENT}(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@sha256:[0-9a-f]{64})?"
)
_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "tar",  # tarfile finds gzip itself
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "tar",
}
_MAX_JSON = 4 << 20  # an index, manifest or config: real ones are a few KiB
_CHUNK = 1 << 20
_WH = ".wh."
_OPAQUE = ".wh..wh..opq"
# Rootless overlay mounts use `userxattr`: the kernel reads user.overlay.* there.
_OPAQUE_XATTR = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"
_OVERLAY_XATTRS = "SCHILY.xattr." + _OPAQUE_XATTR.removesuffix("opaque")
# Upper-dir xattrs that say part of an entry lives in a lower layer (a renamed directory,
# a file whose data was not copied up): an export of the upper dir alone would lose it.
_ELSEWHERE = ("redirect", "metacopy")
# What skopeo may see of our environment: no credentials store, no registries.conf
# aliases, only a proxy the operator set.
_PROXIES = ("http_proxy", "https_proxy", "no_proxy")
_PASSED_ENV = ("PATH", *_PROXIES, *(name.upper() for name in _PROXIES))


@dataclass(frozen=True)
class ImageConfig:
    """What the image's config says a container runs with."""

    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    """An imported image: its layers' digests in the store, bottom first (overlay them in
    this order), and its config. `neutralised` lists what import changed in its layers."""

    reference: str
    digest: str  # the manifest's
    layers: tuple[str, ...]
    config: ImageConfig
    size_bytes: int
    neutralised: tuple[str, ...]


# -- whiteouts ----------------------------------------------------------------------------


def overlay_whiteouts(tree: Path, unpacked: Unpacked) -> None:
    """Turn the OCI whiteouts of the unpacked layer at `tree` into overlayfs whiteouts."""
    for dirpath, dirnames, filenames in os.walk(tree):
        here = Path(dirpath)
        names = sorted(n for n in (*dirnames, *filenames) if n.startswith(_WH))
        if not names:
            continue
        times = os.lstat(here)
        for name in names:
            path = here / name
            shown = str(path.relative_to(tree))
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise InvalidLayer(
                    f"the layer's whiteout {shown!r} is not a file; OCI whiteouts are empty files"
                )
            target = name[len(_WH) :]
            if name != _OPAQUE and target in ("", ".", ".."):
                raise InvalidLayer(f"the layer's whiteout {shown!r} names no file")
            os.unlink(path)
            if name == _OPAQUE:
                os.setxattr(here, _OPAQUE_XATTR, b"y", follow_symlinks=False)
            elif name.startswith(_WH + _WH):
                unpacked.neutralised.append(f"{shown}: AUFS metadata dropped")
            elif os.path.lexists(here / target):
                # OCI: a whiteout hides only lower layers' files, never its own layer's.
                unpacked.neutralised.append(f"{shown}: dropped, the layer holds {target} itself")
            else:
                os.mknod(here / target, stat.S_IFCHR, os.makedev(0, 0))
                os.utime(here / target, ns=(0, 0), follow_symlinks=False)
        dirnames[:] = [d for d in dirnames if not d.startswith(_WH)]
        # Unlinking changed the directory's mtime: the digest must not depend on the clock.
        os.utime(here, ns=(times.st_atime_ns, times.st_mtime_ns), follow_symlinks=False)


def oci_whiteouts(info: tarfile.TarInfo) -> list[tarfile.TarInfo]:
    """The inverse of `overlay_whiteouts`, entry by entry, for `write_canonical(adjust=)` of
    an overlay upper dir: the whiteout (char 0/0) `DIR/NAME` leaves as the empty file
    `DIR/.wh.NAME`, an opaque DIR as DIR plus `DIR/.wh..wh..opq`; overlayfs' bookkeeping
    xattrs (origin, impure) are dropped. InvalidLayer for an entry that overlayfs keeps
    partly in a lower layer (redirect_dir or metacopy mounts, which Corral does not make)."""
    xattrs = {k: v for k, v in info.pax_headers.items() if k.startswith(_OVERLAY_XATTRS)}
    info.pax_headers = {k: v for k, v in info.pax_headers.items() if k not in xattrs}
    for key in xattrs:
        if key.removeprefix(_OVERLAY_XATTRS) in _ELSEWHERE:
            raise InvalidLayer(
                f"{info.name!r} is partly in a lower layer ({key.removeprefix('SCHILY.xattr.')})"
                "; mount overlays without redirect_dir and metacopy to snapshot them"
            )
    if info.ischr() and info.devmajor == info.devminor == 0:
        head, _, name = info.name.rpartition("/")
        whiteout = tarfile.TarInfo(f"{head}/{_WH}{name}" if head else f"{_WH}{name}")
        whiteout.mode, whiteout.mtime = 0o644, info.mtime
        return [whiteout]
    if info.isdir() and xattrs.get(_OVERLAY_XATTRS + "opaque") == "y":
        opaque = tarfile.TarInfo(_OPAQUE if info.name == "." else f"{info.name}/{_OPAQUE}")
        opaque.mode, opaque.mtime = 0o644, info.mtime
        return [info, opaque]
    return [info]


# -- references and skopeo ----------------------------------------------------------------


def _is_loopback(hostport: str) -> bool:
    host = hostport[1:].partition("]")[0] if hostport.startswith("[") else hostport
    host = host if hostport.startswith("[") else host.rpartition(":")[0] or host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOSTPORT = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::\d+)?")


def _is_registry_host(hostport: str) -> bool:
    """Docker's rule: the first part of a name is a registry host when it has a dot or a
    port, or is localhost."""
    return ("." in hostport or ":" in hostport or hostport == "localhost") and bool(
        _HOSTPORT.fullmatch(hostport)
    )


def registry_host(reference: str) -> str | None:
    """The registry (HOST[:PORT]) `pull` would fetch `reference` from; None for a local
    archive. InvalidRequest as `pull` gives it."""
    if reference.startswith(LOCAL_TRANSPORTS):
        return None
    return _source(reference)[1]


def _source(reference: str) -> tuple[str, str | None]:
    """skopeo's source argument for `reference`, and its registry host for docker://.
    Docker's form with its registry host (`docker.io/library/python:3.12`, what a
    Dockerfile's FROM says) is the docker:// one; without a host it is refused, as
    docker:// without one is: Corral never guesses a registry."""
    if not reference.isprintable() or reference != reference.strip():
        raise InvalidRequest(f"{reference!r} is not an image reference")
    if not reference.startswith(("docker://", *LOCAL_TRANSPORTS)):
        hostport, slash, name = reference.partition("/")
        if slash and _is_registry_host(hostport) and _DOCKER_NAME.fullmatch(name):
            reference = f"docker://{reference}"
        elif _DOCKER_NAME.fullmatch(reference):
            library = "" if "/" in reference else "library/"
            raise InvalidRequest(
                f"{reference!r} names no registry host; write it in full, e.g. "
                f"docker.io/{library}{reference} (Docker Hub), or name one of your "
                "team's templates"
            )
    if reference.startswith("docker://"):
        hostport, slash, _name = reference.removeprefix("docker://").partition("/")
        if not slash or not _is_registry_host(hostport):
            raise InvalidRequest(
                f"{reference!r} names no registry host; write it in full, "
                "e.g. docker://registry.example.com/team/image:tag"
            )
        return reference, hostport
    for transport in LOCAL_TRANSPORTS:
        if reference.startswith(transport):
            path, colon, rest = reference.removeprefix(transport).partition(":")
            if not path or not os.path.exists(path):
                raise InvalidRequest(
                    f"{reference!r}: {path!r} does not exist; give the path of the "
                    f"{transport[:-1]} (as TRANSPORT:PATH[:TAG])"
                )
            # Absolute, so no path can read as one of skopeo's options.
            return f"{transport}{os.path.abspath(path)}{colon}{rest}", None
    raise InvalidRequest(
        f"{reference!r} is not an image Corral imports; use HOST/NAME:TAG (or "
        "docker://HOST/NAME:TAG), docker-archive:PATH, oci-archive:PATH or oci:DIR[:TAG]"
    )


def _platform(platform: str) -> tuple[str, ...]:
    parts = tuple(platform.split("/"))
    if len(parts) not in (2, 3) or not all(p.isalnum() for p in parts):
        raise InvalidRequest(
            f"{platform!r} is not a platform; use OS/ARCH[/VARIANT], e.g. linux/amd64"
        )
    return parts


def _check_platform(raw_config: Any, platform: tuple[str, ...]) -> None:
    """skopeo picks the platform out of a multi-platform index, but copies a single-platform
    image whatever it is built for: refuse one built for another platform."""
    keys = ("os", "architecture", "variant")
    found = tuple(raw_config.get(key) if isinstance(raw_config, dict) else None for key in keys)
    for wanted, got in zip(platform, found, strict=False):
        if got is not None and got != wanted:
            built = "/".join(str(part) for part in found if part is not None)
            raise InvalidImage(
                f"the image is built for {built}, not {'/'.join(platform)}; "
                "pull an image (or a platform of it) this host runs"
            )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as out:
        out.write(text)


def _bytes_under(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # skopeo renames as it goes
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _too_big(max_download: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"the image's blobs are more than {max_download} bytes to download; "
        "use a smaller image or ask for a larger template quota"
    )


def _skopeo(args: list[str], work: Path, timeout: float, max_download: int | None) -> None:
    """Run skopeo in `work`, stopping it past `timeout` seconds or once what it wrote
    there passes `max_download` bytes (checked every 0.1 s: a bound with that much slack,
    so that a registry cannot fill the host's disk before the unpack quota applies)."""
    env = {name: os.environ[name] for name in _PASSED_ENV if name in os.environ}
    # Nothing of the host user's container config applies: our own (empty) files.
    env |= {"HOME": str(work), "XDG_RUNTIME_DIR": str(work), "TMPDIR": str(work)}
    (work / "registries.conf").write_text("")
    env["CONTAINERS_REGISTRIES_CONF"] = str(work / "registries.conf")
    # Digests are verified; signatures are not part of this import (yet).
    (work / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    command = ["skopeo", "--policy", str(work / "policy.json"), *args]
    deadline = time.monotonic() + timeout
    with open(work / "skopeo.log", "w+") as log:
        try:
            skopeo = subprocess.Popen(
                command, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        except FileNotFoundError:
            raise ImagePullFailed(
                "skopeo is not installed; run make setup (Debian: skopeo)"
            ) from None
        with skopeo:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    skopeo.wait(timeout=0.1)
                    break
                if time.monotonic() > deadline:
                    skopeo.kill()
                    raise ImagePullFailed(f"skopeo took more than {timeout:g} s to fetch the image")
                if max_download is not None and _bytes_under(work) > max_download:
                    skopeo.kill()
                    raise _too_big(max_download)
        if skopeo.returncode != 0:
            log.seek(0)
            tail = " ".join(log.read().strip().splitlines()[-3:])
            raise ImagePullFailed(f"skopeo could not fetch the image: {tail}")
    # It may have finished between two checks: the bound holds all the same.
    if max_download is not None and _bytes_under(work / "image" / "blobs") > max_download:
        raise _too_big(max_download)


def pull(
    reference: str,
    store: LayerStore,
    *,
    auth: tuple[str, str] | None = None,
    platform: str = "linux/amd64",
    insecure: bool = False,
    max_bytes: int | None = None,
    timeout: float = 600.0,
) -> Image:
    """Import the image `reference` ([docker://]HOST/NAME[:TAG|@DIGEST],
    docker-archive:PATH, oci-archive:PATH, oci:DIR[:TAG]) into `store`. `auth` is (user,
    password) for the registry, handed to skopeo in a private file (never on its command
    line). TLS is verified except for a loopback registry or `insecure=True`. QuotaExceeded past
    `max_bytes` of file data in all layers, and (from a registry) past `max_bytes` of
    blobs downloaded; nothing is left in staging on any failure."""
    source, host = _source(reference)
    wanted = _platform(platform)
    args = ["--override-os", wanted[0], "--override-arch", wanted[1]]
    args += ["--override-variant", wanted[2]] if len(wanted) == 3 else []
    with store.staging() as work:
        args += ["copy", "--quiet"]
        if host is not None:
            auths: dict[str, dict[str, str]] = {}
            if auth is not None:
                token = ":".join(auth).encode()
                auths[host] = {"auth": base64.b64encode(token).decode()}
            _write_private(work / "auth.json", json.dumps({"auths": auths}))
            args += ["--src-authfile", str(work / "auth.json")]
            if insecure or _is_loopback(host):
                args.append("--src-tls-verify=false")
        elif auth is not None:
            raise InvalidRequest(f"{reference!r} is a local archive: it takes no credentials")
        # A local archive is on disk already; a registry's blobs are what could fill it.
        max_download = max_bytes if host is not None else None
        _skopeo([*args, "--", source, f"oci:{work / 'image'}:pulled"], work, timeout, max_download)
        return _import_layout(work / "image", store, reference, max_bytes, wanted)


# -- the layout skopeo wrote --------------------------------------------------------------


def _field(obj: Any, key: str, kind: type, what: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise InvalidImage(f"the image's {what} has no valid {key!r}")
    return value


@contextlib.contextmanager
def _blob(layout: Path, descriptor: Any, what: str) -> Iterator[IO[bytes]]:
    """The blob `descriptor` names, opened after its size and digest were checked."""
    digest = _field(descriptor, "digest", str, what)
    size = _field(descriptor, "size", int, what)
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise InvalidImage(f"the image's {what} has the digest {digest!r}; expected sha256:<hex>")
    path = layout / "blobs" / "sha256" / match.group(1)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidImage(f"the image's {what} is blob {digest}, which the image lacks") from None
    with open(fd, "rb") as blob:
        hashed, length = hashlib.sha256(), 0
        while chunk := blob.read(_CHUNK):
            hashed.update(chunk)
            length += len(chunk)
        if length != size or "sha256:" + hashed.hexdigest() != digest:
            raise InvalidImage(
                f"the image's {what} does not match its digest {digest} (or size {size}): "
                "the image is corrupt or was tampered with"
            )
        blob.seek(0)
        yield blob


def _json_blob(layout: Path, descriptor: Any, what: str) -> Any:
    if _field(descriptor, "size", int, what) > _MAX_JSON:
        raise InvalidImage(f"the image's {what} is larger than {_MAX_JSON} bytes")
    with _blob(layout, descriptor, what) as blob:
        try:
            return json.loads(blob.read())
        except ValueError as exc:
            raise InvalidImage(f"the image's {what} is not JSON: {exc}") from None


def _config(raw: Any) -> ImageConfig:
    config = raw.get("config") if isinstance(raw, dict) else None
    config = config if isinstance(config, dict) else {}

    def strings(key: str) -> tuple[str, ...]:
        value = config.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidImage(f"the image config's {key} is not a list of strings")
        return tuple(value)

    def text(key: str) -> str:
        value = config.get(key) or ""
        if not isinstance(value, str):
            raise InvalidImage(f"the image config's {key} is not a string")
        return value

    labels = config.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise InvalidImage("the image config's Labels is not a map of strings")
    return ImageConfig(
        env=strings("Env"),
        working_dir=text("WorkingDir"),
        user=text("User"),
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        labels=dict(labels),
    )


class _Hashed:
    """A layer's uncompressed tar as it is read, hashed on the way: its diff_id."""

    def __init__(self, stream: IO[bytes] | gzip.GzipFile) -> None:
        self.stream = stream
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(size)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise InvalidLayer(f"the layer's gzip data is corrupt: {exc}") from None
        self.hash.update(data)
        return data

    def diff_id(self) -> str:
        """The sha256 of the whole tar: what tar readers leave unread (padding) included."""
        while self.read(_CHUNK):
            pass
        return "sha256:" + self.hash.hexdigest()


@contextlib.contextmanager
def _uncompressed(blob: IO[bytes], kind: str) -> Iterator[_Hashed]:
    if kind == "tar":
        gzipped = blob.read(2) == b"\x1f\x8b"
        blob.seek(0)
        yield _Hashed(gzip.GzipFile(fileobj=blob, mode="rb") if gzipped else blob)
        return
    try:
        zstd = subprocess.Popen(
            ["zstd", "-dcq"], stdin=blob, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise ImagePullFailed("the image has zstd layers: install zstd (Debian: zstd)") from None
    with zstd:
        try:
            assert zstd.stdout is not None
            yield _Hashed(zstd.stdout)
        finally:
            zstd.kill()  # done or refused: it has nothing more to give


def _stored_layer(store: LayerStore, blob: IO[bytes], kind: str, diff_id: str) -> Layer | None:
    """The stored layer of `diff_id`, once the blob is seen to be that tar (an image's
    config is the image's word, and a digest known is not content owned: checking costs
    a decompression, far less than the unpack and digest it saves)."""
    layer = store.layer_of_diff_id(diff_id)
    if layer is None:
        return None
    with _uncompressed(blob, kind) as stream:
        seen = stream.diff_id()
    blob.seek(0)
    return layer if seen == diff_id else None


def _import_layer(
    store: LayerStore, blob: IO[bytes], kind: str, max_bytes: int | None, diff_id: str
) -> Layer:
    with _uncompressed(blob, kind) as stream:

        def finish(tree: Path, unpacked: Unpacked) -> None:
            seen = stream.diff_id()
            if seen != diff_id:  # before it is stored: a refused image changes nothing
                raise InvalidImage(
                    f"the layer's tar has the sha256 {seen}, not the diff_id {diff_id} the "
                    "image's config names: the image is corrupt or was tampered with"
                )
            overlay_whiteouts(tree, unpacked)

        layer = store.import_tar(stream, max_bytes=max_bytes, finish=finish)  # type: ignore[arg-type]
    store.record_diff_id(diff_id, layer.digest)
    return layer


def _import_layout(
    layout: Path,
    store: LayerStore,
    reference: str,
    max_bytes: int | None,
    platform: tuple[str, ...] = ("linux", "amd64"),
) -> Image:
    try:
        index = json.loads((layout / "index.json").read_bytes()[:_MAX_JSON])
    except (OSError, ValueError) as exc:
        raise InvalidImage(f"skopeo wrote no readable index.json: {exc}") from None
    manifests = _field(index, "manifests", list, "index")
    if len(manifests) != 1 or _field(manifests[0], "mediaType", str, "index") != _MANIFEST:
        raise InvalidImage("the image's index does not name exactly one OCI manifest")
    manifest = _json_blob(layout, manifests[0], "manifest")
    raw_config = _json_blob(layout, _field(manifest, "config", dict, "manifest"), "config")
    descriptors = _field(manifest, "layers", list, "manifest")
    _check_platform(raw_config, platform)
    rootfs = raw_config.get("rootfs") if isinstance(raw_config, dict) else None
    diff_ids = _field(rootfs, "diff_ids", list, "config's rootfs")
    if len(diff_ids) != len(descriptors):
        raise InvalidImage("the image's config and manifest list different numbers of layers")
    digests: list[str] = []
    neutralised: list[str] = []
    total = 0
    for number, descriptor in enumerate(descriptors, 1):
        what = f"layer {number}"
        kind = _LAYER_TYPES.get(_field(descriptor, "mediaType", str, what))
        if kind is None:
            raise InvalidImage(
                f"the image's {what} has the media type {descriptor['mediaType']!r}, "
                "which is not a tar layer"
            )
        diff_id = diff_ids[number - 1]
        if not isinstance(diff_id, str) or _DIGEST.fullmatch(diff_id) is None:
            raise InvalidImage(f"the image's config names no sha256 diff_id for its {what}")
        left = None if max_bytes is None else max_bytes - total
        too_big = QuotaExceeded(
            f"the image {reference} unpacks to more than {max_bytes} bytes; "
            "use a smaller image or ask for a larger template quota"
        )
        with _blob(layout, descriptor, what) as blob:
            try:
                layer = _stored_layer(store, blob, kind, diff_id) or _import_layer(
                    store, blob, kind, left, diff_id
                )
            except QuotaExceeded:
                raise too_big from None
            except InvalidLayer as exc:
                raise InvalidLayer(f"{what} of {reference}: {exc}") from None
            except InvalidImage as exc:
                raise InvalidImage(f"{what} of {reference}: {exc}") from None
        if left is not None and layer.size_bytes > left:  # a stored layer, not unpacked
            raise too_big
        digests.append(layer.digest)
        neutralised += [f"{what}: {line}" for line in layer.neutralised]
        total += layer.size_bytes
    return Image(
        reference=reference,
        digest=manifests[0]["digest"],
        layers=tuple(digests),
        config=_config(raw_config),
        size_bytes=total,
        neutralised=tuple(neutralised),
    )
