"""The layer store: content-addressed, read-only root filesystem layers under one directory.

    ROOT/layers/sha256/HEX/        the unpacked tree (sandboxes mount it as an overlay lower)
    ROOT/layers/sha256/HEX.json    its size, entry count and what import neutralised
    ROOT/refs/HEX/HOLDER           who uses it (a template, a sandbox): removal is refused
    ROOT/diff_ids/HEX              the layer whose uncompressed tar has that sha256 (an OCI
                                   image's `diff_id`): a re-pull skips unpacking it
    ROOT/staging/                  imports and removals in progress
    ROOT/lock                      flock: imports, references and removals do not interleave

A layer's digest is the sha256 of its canonical tar (see `_archive.write_canonical`) taken
from the tree as stored, so two imports of the same content are one layer, whatever order
or compression their archives had. ROOT is 0700: the trees keep their owners and modes for
the sandboxes, and no host user other than Corral's may walk into them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from corral.errors import CorralError, InvalidRequest, LayerInUse, UnknownLayer
from corral.images._archive import Adjust, Unpacked, unpack, write_canonical

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Layer:
    """One stored layer. `neutralised` lists what import changed (setuid bits cleared,
    device nodes and privileged xattrs dropped), one line per entry."""

    digest: str
    path: Path
    size_bytes: int
    entries: int
    neutralised: tuple[str, ...]


class _Sha256Sink:
    """A write-only file that only hashes what it is given."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)


def tree_digest(root: Path) -> str:
    """The digest a tree has as a layer: sha256 of its canonical tar."""
    sink = _Sha256Sink()
    write_canonical(root, sink)  # type: ignore[arg-type]  # tarfile needs only write()
    return "sha256:" + sink.hash.hexdigest()


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._layers = root / "layers" / "sha256"
        self._refs = root / "refs"
        self._staging = root / "staging"
        self._diff_ids = root / "diff_ids"
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        for path in (self._layers, self._refs, self._staging, self._diff_ids):
            path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    # -- import -------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private scratch directory on the store's filesystem, removed on exit (an
        importer's downloads land here, so a failed import leaves nothing behind)."""
        staging = Path(tempfile.mkdtemp(dir=self._staging))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def import_tar(
        self,
        stream: IO[bytes],
        *,
        max_bytes: int | None = None,
        finish: Callable[[Path, Unpacked], None] | None = None,
    ) -> Layer:
        """Store the root filesystem in the tar read from `stream` (gzip, xz, bzip2 or plain)
        as a layer. Refuses `..` paths and writes through symlinks (InvalidLayer, nothing
        stored); neutralises device nodes, setuid bits and privileged xattrs; stops with
        QuotaExceeded past `max_bytes` of file data (a decompression bomb stops there).
        `finish(tree, unpacked)` runs on the checked tree before it is digested: the OCI
        importer turns `.wh.` entries into overlay whiteouts there."""
        with self.staging() as staging:
            tree = staging / "tree"
            tree.mkdir(mode=0o755)
            unpacked = unpack(stream, tree, max_bytes)
            if finish is not None:
                finish(tree, unpacked)
            return self._commit(staging, tree, unpacked)

    def import_dir(
        self,
        source: Path,
        *,
        max_bytes: int | None = None,
        adjust: Adjust | None = None,
        finish: Callable[[Path, Unpacked], None] | None = None,
    ) -> Layer:
        """Store a copy of the directory `source` (a bootstrapped rootfs, a sandbox's upper
        dir) as a layer: its canonical tar, streamed through the same checks as any tar.
        `adjust` rewrites the tar's entries on the way out of `source` and `finish` the
        checked tree (see `import_tar`): a snapshot turns overlay whiteouts into OCI ones
        and back there."""
        if not source.is_dir() or source.is_symlink():
            raise InvalidRequest(f"{source} is not a directory; give the root of a filesystem")
        read_fd, write_fd = os.pipe()
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                with open(write_fd, "wb") as pipe:
                    write_canonical(source, pipe, adjust)
            except BrokenPipeError:
                pass  # the importer stopped reading: its own error is the one to report
            except OSError as exc:
                failure.append(InvalidRequest(f"could not read {source} as a layer: {exc}"))
            except BaseException as exc:  # reported by the importer's thread below
                failure.append(exc)

        def produced(tree: Path, unpacked: Unpacked) -> None:
            # The tar ended: the producer wrote all it will. A tar cut short by its failure
            # may still read as a whole one: never store it.
            producer.join()
            if failure:
                raise failure[0]
            if finish is not None:
                finish(tree, unpacked)

        producer = threading.Thread(target=produce, name="corral-layer-tar", daemon=True)
        producer.start()
        try:
            with open(read_fd, "rb") as pipe:
                return self.import_tar(pipe, max_bytes=max_bytes, finish=produced)
        except CorralError:
            producer.join()
            if failure:  # the cause, not the importer's view of a cut tar
                raise failure[0] from None
            raise
        finally:
            producer.join()

    def adopt(self, layer: Layer) -> Layer:
        """Store `layer`, a layer of another store on the same file system, by hard links
        (`cp -al`): a layer's files are never written, so the stores can share them, and
        nothing is unpacked or digested again (the other store checked it). Seconds less
        per copy of a big base, for tests that give each server its own store."""
        hex_digest = self._hex(layer.digest)
        if (self._layers / hex_digest).is_dir():
            return self.get(layer.digest)
        with self.staging() as staging:
            tree = staging / "tree"
            done = subprocess.run(
                ["cp", "-a", "--link", "--", str(layer.path), str(tree)],
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
            )
            if done.returncode != 0:
                raise InvalidRequest(
                    f"could not link the layer {layer.digest} from {layer.path} (another "
                    f"file system?): {done.stderr.strip()[-200:]}"
                )
            shutil.copyfile(layer.path.parent / f"{hex_digest}.json", staging / "meta.json")
            with self._locked():
                if not (self._layers / hex_digest).exists():
                    os.replace(staging / "meta.json", self._layers / f"{hex_digest}.json")
                    os.rename(tree, self._layers / hex_digest)
        return self.get(layer.digest)

    def _commit(self, staging: Path, tree: Path, unpacked: Unpacked) -> Layer:
        digest = tree_digest(tree)
        hex_digest = digest.removeprefix("sha256:")
        meta = {
            "digest": digest,
            "size_bytes": unpacked.size_bytes,
            "entries": unpacked.entries,
            "neutralised": unpacked.neutralised,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        with self._locked():
            target = self._layers / hex_digest
            if not target.exists():
                # Metadata first: a tree without its .json is never listed as a layer.
                os.replace(staging / "meta.json", self._layers / f"{hex_digest}.json")
                os.rename(tree, target)
            else:  # the same content is stored already: new again for `collect`'s grace
                os.utime(self._layers / f"{hex_digest}.json")
        return self.get(digest)

    # -- queries ------------------------------------------------------------------------

    def _hex(self, digest: str) -> str:
        match = _DIGEST.fullmatch(digest)
        if match is None:
            raise InvalidRequest(f"{digest!r} is not a layer digest; expected sha256:<64 hex>")
        return match.group(1)

    def get(self, digest: str) -> Layer:
        hex_digest = self._hex(digest)
        path = self._layers / hex_digest
        try:
            meta = json.loads((self._layers / f"{hex_digest}.json").read_text())
        except FileNotFoundError:
            raise UnknownLayer(f"no stored layer has the digest {digest}") from None
        if not path.is_dir():
            raise UnknownLayer(f"no stored layer has the digest {digest}")
        return Layer(
            digest=digest,
            path=path,
            size_bytes=meta["size_bytes"],
            entries=meta["entries"],
            neutralised=tuple(meta["neutralised"]),
        )

    def layers(self) -> list[Layer]:
        return [
            self.get(f"sha256:{meta.stem}")
            for meta in sorted(self._layers.glob("*.json"))
            if (self._layers / meta.stem).is_dir()
        ]

    # -- references and removal ---------------------------------------------------------

    def reference(self, digest: str, holder: str) -> None:
        """Record that `holder` (a template name, a sandbox id) uses the layer."""
        hex_digest = self._hex(digest)
        if _HOLDER.fullmatch(holder) is None:
            raise InvalidRequest(
                f"{holder!r} cannot name a layer's user; use letters, digits, '.', '_', '-'"
            )
        with self._locked():
            self.get(digest)
            (self._refs / hex_digest).mkdir(exist_ok=True)
            (self._refs / hex_digest / holder).touch()

    def release(self, digest: str, holder: str) -> None:
        with self._locked():
            (self._refs / self._hex(digest) / holder).unlink(missing_ok=True)

    def holders(self, digest: str) -> list[str]:
        refs = self._refs / self._hex(digest)
        return sorted(p.name for p in refs.iterdir()) if refs.is_dir() else []

    def remove(self, digest: str) -> None:
        """Delete the layer; refused (LayerInUse, nothing changed) while anything uses it."""
        hex_digest = self._hex(digest)
        with self._locked():
            self.get(digest)
            if users := self.holders(digest):
                raise LayerInUse(f"layer {digest} is used by {', '.join(users)}; remove them first")
            doomed = self._unlist(hex_digest)
        shutil.rmtree(doomed)

    def collect(self, keep: set[str], *, min_age: float = 600.0) -> list[str]:
        """Remove every layer that is not in `keep`, that nothing holds (refs/) and that was
        not stored (or imported again) in the last `min_age` seconds; the digests removed.

        The grace is what keeps an import safe: its caller gets the layer before it can
        reference it (or record it in `keep`'s source, the SQL store), and an import of
        content already stored makes that layer new again. `keep` is what the caller's
        records use (templates, builds' cache); the refs cover live users."""
        hexes = {self._hex(digest) for digest in keep}
        removed: list[tuple[str, Path]] = []
        for meta in sorted(self._layers.glob("*.json")):
            if meta.stem in hexes:
                continue
            with self._locked():
                try:
                    age = time.time() - meta.stat().st_mtime
                except FileNotFoundError:
                    continue  # removed meanwhile
                if age < min_age or self.holders(f"sha256:{meta.stem}"):
                    continue
                removed.append((f"sha256:{meta.stem}", self._unlist(meta.stem)))
        with self._locked():  # index entries of layers no longer stored
            for entry in self._diff_ids.iterdir():
                if not (
                    self._layers / f"{entry.read_text().removeprefix('sha256:')}.json"
                ).exists():
                    entry.unlink()
        for _, doomed in removed:
            shutil.rmtree(doomed)
        return [digest for digest, _ in removed]

    def _unlist(self, hex_digest: str) -> Path:
        """Take the layer out of the listing (atomic; under the lock) and move its tree into
        staging; the caller deletes what is returned (slow) after the lock."""
        (self._layers / f"{hex_digest}.json").unlink()
        doomed = Path(tempfile.mkdtemp(dir=self._staging))
        os.rename(self._layers / hex_digest, doomed / "tree")
        with contextlib.suppress(FileNotFoundError):
            (self._refs / hex_digest).rmdir()
        return doomed

    # -- OCI diff_ids -------------------------------------------------------------------

    def record_diff_id(self, diff_id: str, digest: str) -> None:
        """Record that the uncompressed tar with sha256 `diff_id` (as computed by the
        importer, never as an image claims it) unpacked into the layer `digest`."""
        entry = self._diff_ids / self._hex(diff_id)
        with self._locked():
            self.get(digest)
            tmp = entry.with_suffix(".tmp")
            tmp.write_text(digest)
            os.replace(tmp, entry)
            os.utime(self._layers / f"{self._hex(digest)}.json")  # new again (see collect)

    def layer_of_diff_id(self, diff_id: str) -> Layer | None:
        """The stored layer recorded for `diff_id`, None when there is none (any more)."""
        try:
            digest = (self._diff_ids / self._hex(diff_id)).read_text()
        except FileNotFoundError:
            return None
        try:
            return self.get(digest)
        except UnknownLayer:
            return None
