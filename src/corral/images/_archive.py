"""Layer archives: unpack an untrusted tar into a directory safely, and write a directory
back as one canonical tar (whose sha256 is the layer's digest).

Unpacking never resolves a path on the host: every parent directory is opened one
component at a time with O_NOFOLLOW relative to the layer's root, so a symlink in the
archive (absolute ones are normal in a root filesystem) can never redirect a write out of
the layer. What a layer may not hold is refused (`..` components, hard links to nothing
before them) or neutralised and reported (device nodes dropped, setuid/setgid bits
cleared, xattrs other than `user.*` dropped — `trusted.overlay.*`/`user.overlay.*` would
let a layer forge overlayfs whiteouts and redirects, `security.capability` is setuid by
another name).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from corral.errors import InvalidLayer, QuotaExceeded

_XATTR = "SCHILY.xattr."
_CHUNK = 1 << 20
# What an entry itself can cause (a name too long, a link count past the limit).
_ENTRY_ERRORS = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EMLINK, errno.EEXIST})
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_IS_ROOT = os.geteuid() == 0
# A layer's paths stay well under PATH_MAX (4096) with the store's own prefix in front, and
# its depth under what recursive tree walkers (shutil.rmtree in Python 3.11) survive.
MAX_PATH_BYTES = 3072
MAX_DEPTH = 512


_IMPLICIT_DIR = tarfile.TarInfo(".")
_IMPLICIT_DIR.type, _IMPLICIT_DIR.mode, _IMPLICIT_DIR.mtime = tarfile.DIRTYPE, 0o755, 0


@dataclass
class Unpacked:
    """What an unpacked archive held, and what was changed on the way in."""

    size_bytes: int = 0
    entries: int = 0
    neutralised: list[str] = field(default_factory=list)


def _parts(name: str, what: str) -> tuple[str, ...]:
    # Leading '/' and './' are how tar writes a root filesystem: relative to the layer.
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidLayer(
            f"the layer's {what} {name!r} climbs out of the layer with '..'; "
            "archive paths must stay inside the root"
        )
    if len(parts) > MAX_DEPTH:
        raise InvalidLayer(
            f"the layer's {what} {name[:64]!r}... is nested {len(parts)} directories deep; "
            f"Corral stores at most {MAX_DEPTH}"
        )
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise InvalidLayer(
            f"the layer's {what} {name[:64]!r}... is longer than {MAX_PATH_BYTES} bytes; "
            "Corral stores paths the host can still name (PATH_MAX)"
        )
    return parts


def _kept_xattrs(member: tarfile.TarInfo, out: Unpacked) -> list[tuple[str, bytes]]:
    kept = []
    for key, value in sorted(member.pax_headers.items()):
        if not key.startswith(_XATTR):
            continue
        name = key[len(_XATTR) :]
        if name.startswith("user.") and not name.startswith("user.overlay."):
            kept.append((name, value.encode("utf-8", "surrogateescape")))
        else:
            out.neutralised.append(f"{member.name}: xattr {name} dropped")
    return kept


class _Unpacker:
    def __init__(self, root: Path, max_bytes: int | None) -> None:
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.max_bytes = max_bytes
        self.out = Unpacked()
        # Directories get their mode and mtime last: creating entries in them changes both.
        self.dirs: list[tuple[tuple[str, ...], tarfile.TarInfo, list[tuple[str, bytes]]]] = []
        # Directories the archive does not list (its root, often; parents of its entries)
        # get fixed metadata, never "now": the same archive must give the same tree.
        self.implicit: list[tuple[str, ...]] = [()]

    @contextlib.contextmanager
    def parent(self, parts: tuple[str, ...], name: str) -> Iterator[int]:
        """The open directory that holds `parts`, creating missing directories on the way."""
        fd = os.dup(self.root_fd)
        try:
            for depth, part in enumerate(parts[:-1]):
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    self.implicit.append(parts[: depth + 1])
                except OSError as exc:  # ELOOP/ENOTDIR: a symlink or a file on the way
                    raise InvalidLayer(
                        f"the layer's entry {name!r} goes through {part!r}, which is not a "
                        "directory (a symlink cannot carry writes out of the layer)"
                    ) from exc
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _clear(self, fd: int, leaf: str, name: str) -> None:
        """Make room for an entry a later member replaces (tar's last-one-wins)."""
        try:
            st = os.lstat(leaf, dir_fd=fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise InvalidLayer(f"the layer's entry {name!r} replaces a directory")
        os.unlink(leaf, dir_fd=fd)

    def _finish(self, fd: int, leaf: str, member: tarfile.TarInfo, mode: int | None) -> None:
        if _IS_ROOT:
            os.chown(leaf, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        if mode is not None:
            os.chmod(leaf, mode, dir_fd=fd)
        mtime = int(member.mtime) * 1_000_000_000
        os.utime(leaf, ns=(mtime, mtime), dir_fd=fd, follow_symlinks=False)

    def _mode(self, member: tarfile.TarInfo) -> int:
        if member.mode & 0o6000:
            self.out.neutralised.append(f"{member.name}: setuid/setgid bits cleared")
        return member.mode & 0o1777

    def _count(self, size: int) -> None:
        self.out.size_bytes += size
        if self.max_bytes is not None and self.out.size_bytes > self.max_bytes:
            raise QuotaExceeded(
                f"the layer unpacks to more than {self.max_bytes} bytes; "
                "use a smaller image or ask for a larger template quota"
            )

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = _parts(member.name, "entry")
        self.out.entries += 1
        if member.isdir():
            self._directory(parts, member)
            return
        if not parts:
            raise InvalidLayer(f"the layer's entry {member.name!r} makes its root a non-directory")
        if member.ischr() or member.isblk():
            # A sandbox gets its own /dev; a device node in a layer is only a way in.
            self.out.neutralised.append(f"{member.name}: device node dropped")
            return
        xattrs = _kept_xattrs(member, self.out)
        leaf = parts[-1]
        with self.parent(parts, member.name) as fd:
            self._clear(fd, leaf, member.name)
            if member.isreg():
                self._file(tar, member, fd, leaf, xattrs)
            elif member.issym():
                os.symlink(member.linkname, leaf, dir_fd=fd)
                self._finish(fd, leaf, member, None)
            elif member.islnk():
                self._hardlink(member, fd, leaf)
            elif member.isfifo():
                os.mkfifo(leaf, 0o600, dir_fd=fd)
                self._finish(fd, leaf, member, self._mode(member))
            else:
                raise InvalidLayer(
                    f"the layer's entry {member.name!r} has a type Corral does not store "
                    f"({member.type!r})"
                )

    def _file(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        fd: int,
        leaf: str,
        xattrs: list[tuple[str, bytes]],
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        data = tar.extractfile(member)
        out = os.open(leaf, flags, 0o600, dir_fd=fd)
        try:
            while data is not None and (chunk := data.read(_CHUNK)):
                self._count(len(chunk))
                os.write(out, chunk)
            if _IS_ROOT:
                os.fchown(out, member.uid, member.gid)
            os.fchmod(out, self._mode(member))
            for name, value in xattrs:
                os.setxattr(out, name, value)
            mtime = int(member.mtime) * 1_000_000_000
            os.utime(out, ns=(mtime, mtime))
        finally:
            os.close(out)

    def _hardlink(self, member: tarfile.TarInfo, fd: int, leaf: str) -> None:
        target = _parts(member.linkname, "hard link target")
        try:
            with self.parent(target, member.name) as target_fd:
                os.link(
                    target[-1], leaf, src_dir_fd=target_fd, dst_dir_fd=fd, follow_symlinks=False
                )
        except (FileNotFoundError, IndexError, PermissionError, IsADirectoryError) as exc:
            raise InvalidLayer(
                f"the layer's hard link {member.name!r} points at {member.linkname!r}, which "
                "is not a file the layer holds before it"
            ) from exc

    def _directory(self, parts: tuple[str, ...], member: tarfile.TarInfo) -> None:
        xattrs = _kept_xattrs(member, self.out)
        if parts:
            with self.parent(parts, member.name) as fd:
                try:
                    st = os.lstat(parts[-1], dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(parts[-1], 0o700, dir_fd=fd)
                else:
                    if not stat.S_ISDIR(st.st_mode):
                        os.unlink(parts[-1], dir_fd=fd)
                        os.mkdir(parts[-1], 0o700, dir_fd=fd)
        self.dirs.append((parts, member, xattrs))

    def finish_directories(self) -> None:
        no_xattrs: list[tuple[str, bytes]] = []
        unlisted = [(parts, _IMPLICIT_DIR, no_xattrs) for parts in reversed(self.implicit)]
        # Unlisted first, so that a later entry for the same directory wins; then the
        # listed ones, deepest (listed later) first.
        for parts, member, xattrs in [*unlisted, *reversed(self.dirs)]:
            with contextlib.ExitStack() as stack:
                fd, leaf = self.root_fd, "."  # the layer's own root
                if parts:
                    fd, leaf = stack.enter_context(self.parent(parts, member.name)), parts[-1]
                if xattrs:
                    dir_fd = os.open(leaf, _DIR_FLAGS, dir_fd=fd)
                    stack.callback(os.close, dir_fd)
                    for name, value in xattrs:
                        os.setxattr(dir_fd, name, value)
                self._finish(fd, leaf, member, self._mode(member))

    def close(self) -> None:
        os.close(self.root_fd)


def unpack(stream: IO[bytes], root: Path, max_bytes: int | None = None) -> Unpacked:
    """Unpack the tar (plain or compressed) read from `stream` into the empty dir `root`."""
    unpacker = _Unpacker(root, max_bytes)
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    try:
                        unpacker.member(tar, member)
                    except OSError as exc:
                        if exc.errno not in _ENTRY_ERRORS:
                            raise  # the host's trouble (ENOSPC, EIO), not the archive's
                        raise InvalidLayer(
                            f"the layer's entry {member.name!r} cannot be stored: {exc.strerror}"
                        ) from exc
        except tarfile.TarError as exc:
            raise InvalidLayer(f"the layer is not a readable tar archive: {exc}") from exc
        unpacker.finish_directories()
    finally:
        unpacker.close()
    return unpacker.out


# Rewrites one entry of a tree being archived into the entries to write in its place (none
# drops it); a regular file's data goes with the entry that is the one given.
Adjust = Callable[[tarfile.TarInfo], list[tarfile.TarInfo]]


def write_canonical(root: Path, out: IO[bytes], adjust: Adjust | None = None) -> None:
    """Write the tree under `root` as a canonical tar: entries sorted by path, PAX format,
    whole-second mtimes, numeric owners only, xattrs sorted, a hard link pointing at the
    first path (in that order) of its inode. Equal trees give equal bytes. `adjust`
    rewrites entries on the way (a snapshot's whiteouts and owners)."""
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tar:
        seen: dict[tuple[int, int], str] = {}
        for path, name in _walk(root):
            st = os.lstat(path)
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            info.mtime = st.st_mtime_ns // 1_000_000_000
            info.uname = info.gname = ""
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFDIR:
                info.type = tarfile.DIRTYPE
            elif fmt == stat.S_IFLNK:
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            elif fmt == stat.S_IFREG and st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
                info.type, info.linkname = tarfile.LNKTYPE, seen[(st.st_dev, st.st_ino)]
            elif fmt == stat.S_IFREG:
                seen.setdefault((st.st_dev, st.st_ino), name)
                info.size = st.st_size
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                # Kept in the stream so the importer (one place) decides: it drops them.
                info.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif fmt == stat.S_IFIFO:
                info.type = tarfile.FIFOTYPE
            else:
                continue  # sockets cannot be archived; a program recreates its own
            if fmt != stat.S_IFLNK:
                info.pax_headers = {
                    _XATTR + xname: os.getxattr(path, xname, follow_symlinks=False).decode(
                        "utf-8", "surrogateescape"
                    )
                    for xname in sorted(os.listxattr(path, follow_symlinks=False))
                }
            for entry in [info] if adjust is None else adjust(info):
                if entry is info and info.type == tarfile.REGTYPE:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as data:
                        tar.addfile(info, data)
                else:
                    tar.addfile(entry)


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """Every path under `root` (itself first, as "."), depth first, children sorted;
    iterative, so a deep tree cannot exhaust Python's recursion limit."""
    pending: list[tuple[Path, str]] = [(root, ".")]
    while pending:
        path, name = pending.pop()
        yield path, name
        if not path.is_symlink() and path.is_dir():
            for child in sorted(os.listdir(path), reverse=True):
                pending.append((path / child, child if name == "." else f"{name}/{child}"))
