"""The `/` of a sandbox of a layer template: its own disk, its template's layers, an overlay.

Per sandbox, each piece recorded in its footprint before it is made (a crash is undone by
the reaper):
1. its disk (`corral.isolation.disks`): a sparse ext4 image of `disk_mib` under the data
   dir (never the runtime dir's tmpfs: writes must not be memory), loop-mounted
   nosuid,nodev. It holds the
   overlay's upper/ and work/ and /dev/shm; ENOSPC at its size is the loop fs's own, the
   host's fs only sees the sparse file grow. With `ram_disk` it is a tmpfs of the
   storage size instead (`Limits.storage_bytes`): what the sandbox writes is memory,
   charged to its cgroup.
2. each layer bind-mounted read-only and *idmapped* with the sandbox's id range: what the
   layer stores as owned by uid N appears owned by host id FIRST+N, which is uid N in the
   sandbox's user namespace, so root, _apt or postgres keep their identity inside, and
   the sandbox's root (dpkg, apt-get) writes anywhere in `/` as the image's owners do.
   Every write is copied up to its own disk, owned by ids of its range. The layer itself
   is never written (read-only lower of an overlay, read-only mount).
3. overlayfs of those layers under the disk's upper dir: the tree bubblewrap binds at `/`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.config import IDS_PER_SLOT
from corral.errors import InvalidRequest, SandboxStartFailed
from corral.images import mount_overlay
from corral.isolation.disks import DISK_DIRS, DiskSpares, make_disk_dirs
from corral.isolation.footprint import Footprint
from corral.isolation.templates import SANDBOX_UID, SANDBOX_USER, LayerTemplate

log = logging.getLogger("corral.isolation")
_libc = ctypes.CDLL(None, use_errno=True)
# x86_64 and arm64 share these numbers (new syscalls are numbered alike everywhere).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _MOVE_MOUNT_F_EMPTY_PATH = 1, 0x1000, 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_AT_FDCWD = -100
_MS_NOSUID, _MS_NODEV = 0x2, 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise SandboxStartFailed(
            f"could not {what}: {os.strerror(err)} (a layer template needs Linux 5.19+ "
            "with idmapped mounts on the layer store's file system)"
        )
    return result


def make_root(
    footprint: Footprint,
    template: LayerTemplate,
    disks: DiskSpares,
    disk: Path,
    disk_bytes: int,
    first: int,
    userns_of: Callable[[], int],
    accounts: Path | None = None,
    *,
    ram_disk: bool = False,
    upper: Path | None = None,
) -> Path:
    """Make the sandbox's disk (image file `disk`), idmapped layers and overlay; the
    mounted root. `first` is the host id of the sandbox's uid 0 and `userns_of` gives the
    user namespace mapping its range (`corral.isolation.idrange`): the layers' owners keep
    their identity inside, and what the sandbox's root writes is `first`'s on its disk.
    `accounts` (`Accounts.layer`) goes on top of the template's layers. With `ram_disk`
    the disk is a tmpfs of `disk_bytes` instead (no image): its pages are charged to the
    sandbox's memory, like a `host` sandbox's storage. `upper` is an upper dir to start
    from (a checkpoint's: `gvisor`), copied onto the disk before the overlay is mounted."""
    layers = [*template.layers, *([accounts] if accounts else [])]
    mnt, lowers, root = footprint.path / "disk", footprint.path / "layers", footprint.path / "root"
    targets = [lowers / str(i) for i in range(len(layers))]
    # The layers' idmap, for a snapshot to map the upper dir's owners back (`snapshots`).
    footprint.layer_ids = [first, first, IDS_PER_SLOT]
    # All recorded at once: each record is a file write (~1-2 ms on a busy disk).
    image = None if ram_disk else str(disk)
    footprint.record_mounts([str(p) for p in (mnt, *targets, root)], disk=image)
    try:
        mnt.mkdir(mode=0o700)
        if ram_disk:
            _mount_tmpfs(mnt, disk_bytes)
        else:
            disks.take(disk, disk_bytes, mnt)
        for name, _mode in DISK_DIRS:
            os.chown(mnt / name, first, first)
        if upper is not None:  # owners, modes, whiteouts and xattrs as they were
            _run(["cp", "-a", f"{upper}/.", str(mnt / "upper")], "restore the sandbox's files")
    except BaseException:
        with contextlib.suppress(Exception):
            os.close(userns_of())  # its child waited for
        raise
    userns = userns_of()
    lowers.mkdir(mode=0o700)
    try:
        for layer, target in zip(layers, targets, strict=True):
            target.mkdir()
            _bind_idmapped(layer, target, userns)
    finally:
        os.close(userns)
    root.mkdir(mode=0o755)
    # The sandbox reads its `/`'s mount options in /proc/self/mountinfo: name the layers
    # and the upper dir through a file descriptor, not by host paths (they would name the
    # runtime dir, see `namespace._shared_root`).
    here = os.open(footprint.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        via = Path(f"/proc/self/fd/{here}")
        lowers_via = [via / path.relative_to(footprint.path) for path in targets]
        mount_overlay(lowers_via, via / "disk" / "upper", via / "disk" / "work", root)
    finally:
        os.close(here)
    return root


@dataclass(frozen=True)
class LayerRoot:
    """A sandbox's mounted `/` (`make_root`) and the template's user in it."""

    path: Path
    uid: int
    gid: int
    home: str


def make_user_root(
    footprint: Footprint,
    template: LayerTemplate,
    disks: DiskSpares,
    accounts: Accounts,
    disk: Path,
    disk_bytes: int,
    first: int,
    userns_of: Callable[[], int],
    *,
    ram_disk: bool = False,
    upper: Path | None = None,
) -> LayerRoot:
    """`make_root`, then the users every sandbox has (root, `user`), the template's
    user looked up (InvalidRequest when its /etc/passwd lacks it) and its places made."""
    layer = accounts.layer(template)
    root = make_root(
        footprint,
        template,
        disks,
        disk,
        disk_bytes,
        first,
        userns_of,
        layer,
        ram_disk=ram_disk,
        upper=upper,
    )
    home = f"/home/{SANDBOX_USER}"
    if layer is None:
        # `user` has a name (`id -un`, prompts), in files root may edit (copied up);
        # kept as a layer for the template's next sandboxes.
        shell = login_shell(root)
        line = f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}:{SANDBOX_USER}:{home}:{shell}\n"
        add_account(root, "passwd", SANDBOX_UID, line)
        add_account(root, "group", SANDBOX_UID, f"{SANDBOX_USER}:x:{SANDBOX_UID}:\n")
        accounts.keep(template, root, first)
    # root and user exist in every sandbox, with or without an /etc/passwd.
    known = {"root": (0, 0, "/root"), SANDBOX_USER: (SANDBOX_UID, SANDBOX_UID, home)}
    found = lookup_user(root, template.user) or known.get(template.user)
    if found is None:
        raise InvalidRequest(
            f"the template {template.name!r} runs as user {template.user!r}, which its "
            "/etc/passwd does not have: add the user in the template, or use root or user"
        )
    make_places(root, first, found[:2])
    return LayerRoot(root, found[0], found[1], found[2])


def _mount_tmpfs(target: Path, size_bytes: int) -> None:
    """A RAM disk at `target` (recorded by the caller) with the directories of a disk."""
    options = f"size={size_bytes},mode=755".encode()  # as an ext4 disk's top directory
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options):
        err = ctypes.get_errno()
        raise SandboxStartFailed(f"could not mount the sandbox's RAM disk: {os.strerror(err)}")
    make_disk_dirs(target)


class Accounts:
    """A small layer per template, on top of its own, whose /etc/passwd and /etc/group
    are the template's with `user` added: made from the first sandbox's (after
    `add_account`), so later sandboxes start with `user` without copying both files up to
    their disk (~1-3 ms). Kept under `directory` by the template's layer digests (its
    content never changes); none when the template's /etc or those files are not plain
    (a symlinked /etc would be hidden by the layer's directory)."""

    FILES = ("passwd", "group")

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _path(self, template: LayerTemplate) -> Path:
        key = hashlib.sha256("\0".join([SANDBOX_USER, *template.digests]).encode())
        return self._directory / key.hexdigest()[:32]

    def layer(self, template: LayerTemplate) -> Path | None:
        path = self._path(template)
        return path if path.is_dir() else None

    def keep(self, template: LayerTemplate, root: Path, first: int) -> None:
        """Make the layer of `template` from `root` (a sandbox's, whose ids start at host
        id `first`), unless made or not possible; failing is harmless."""
        target = self._path(template)
        if target.is_dir():
            return
        try:
            etc = os.lstat(root / "etc")
            files = {name: os.lstat(root / "etc" / name) for name in self.FILES}
            kinds = [stat.S_ISDIR(etc.st_mode)] + [stat.S_ISREG(f.st_mode) for f in files.values()]
            if not all(kinds) or any(f.st_size > 1 << 20 for f in files.values()):
                return
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self._directory))
            try:
                # Its owners as the sandbox sees them: the layer is idmapped like the rest.
                _copy_attrs(etc, staging / "etc", first, make=True)
                for name, st in files.items():
                    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(root / "etc" / name, flags)
                    with os.fdopen(fd, "rb") as f:
                        (staging / "etc" / name).write_bytes(f.read(1 << 20))
                    _copy_attrs(st, staging / "etc" / name, first)
                staging.chmod(0o755)
                staging.rename(target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        except (OSError, ValueError):
            log.debug("no accounts layer for template %s", template.name, exc_info=True)


def _copy_attrs(st: os.stat_result, path: Path, first: int, make: bool = False) -> None:
    """Give `path` (made as a directory if `make`) the mode of `st` and its owners as the
    sandbox sees them (host ids less `first`); ValueError when they are not in its range."""
    uid, gid = st.st_uid - first, st.st_gid - first
    if not (0 <= uid < 65536 and 0 <= gid < 65536):
        raise ValueError("owner outside the sandbox's range")
    if make:
        path.mkdir()
    os.chown(path, uid, gid, follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(st.st_mode))


def make_places(root: Path, first: int, owner: tuple[int, int]) -> None:
    """The sandbox's /workspace (of `owner`, its default user's uid and gid inside),
    /home/user (of `user`, 1000) and /tmp, made here as the host's root (copied up)."""
    user = first + SANDBOX_UID
    _own_dir(root, "workspace", 0o755, first + owner[0], first + owner[1])
    _own_dir(root, "home/user", 0o755, user, user)
    _own_dir(root, "tmp", 0o1777, first, first)


def lookup_user(root: Path, name: str) -> tuple[int, int, str] | None:
    """The uid, gid and home of `name` (a user name or a number) in the root's
    /etc/passwd; None when it has no such user. A number missing from passwd is taken as
    is (its gid the same, home /), as `docker run --user 1234` does."""
    found = resolve_in(root, "/etc/passwd")
    entries: list[list[str]] = []
    if found is not None and found.is_file():
        with found.open("rb") as f:
            text = f.read(1 << 20).decode(errors="replace")
        entries = [line.split(":") for line in text.splitlines() if line.count(":") >= 3]
    for entry in entries:
        ids = entry[2:4]
        if name in entry[0:3:2] and all(i.isdigit() and int(i) < 65536 for i in ids):
            return int(ids[0]), int(ids[1]), (entry[5:6] or ["/"])[0] or "/"
    if name.isdigit() and int(name) < 65536:
        return int(name), int(name), "/"
    return None


def _own_dir(root: Path, path: str, mode: int, uid: int, gid: int) -> None:
    """Make `root`/`path` a directory of `uid` with `mode`, never following a symlink:
    the tree is the template's, and this runs as the host's root (a layer's `/tmp ->
    /etc` must not make the host's /etc the sandbox's)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in path.split("/"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                raise SandboxStartFailed(
                    f"the template's /{path} is not a directory (a symlink or a file): "
                    "fix the template"
                ) from exc
            os.close(fd)
            fd = child
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def shm_dir(footprint: Footprint) -> Path:
    """The sandbox's /dev/shm, on its disk."""
    return footprint.path / "disk" / "shm"


def upper_dir(footprint: Footprint) -> Path:
    """Everything the sandbox changed in its `/` (overlayfs' upper dir), on its disk."""
    return footprint.path / "disk" / "upper"


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SandboxStartFailed(f"could not {what}: {done.stderr.strip()[-300:]}")


def _bind_idmapped(source: Path, target: Path, userns: int, *, read_only: bool = True) -> None:
    """Bind `source` at `target`, nosuid, nodev, read-only unless asked (a volume), owners
    mapped through `userns`."""
    syscall = _libc.syscall
    tree = _check(
        syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(source).encode(), _OPEN_TREE_CLONE | os.O_CLOEXEC),
        f"clone the layer {source}",
    )
    try:
        attr = _MountAttr(
            _MOUNT_ATTR_IDMAP
            | (_MOUNT_ATTR_RDONLY if read_only else 0)
            | _MOUNT_ATTR_NOSUID
            | _MOUNT_ATTR_NODEV,
            0,
            0,
            userns,
        )
        _check(
            syscall(
                _SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            f"idmap the layer {source}",
        )  # fmt: skip
        _check(
            syscall(
                _SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, str(target).encode(),
                _MOVE_MOUNT_F_EMPTY_PATH,
            ),
            f"mount the layer {source}",
        )  # fmt: skip
    finally:
        os.close(tree)


def add_account(root: Path, name: str, number: int, line: str) -> None:
    """Append `line` to the root's /etc/`name` (passwd, group) unless an entry has id
    `number`; nothing when it is missing or not a regular file. Never follows a symlink
    (this runs as the host's root); opening it for writing copies it up to the disk."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    top = os.open(root, flags)
    try:
        etc = os.open("etc", flags, dir_fd=top)
    except OSError:
        return
    finally:
        os.close(top)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=etc)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            with os.fdopen(os.dup(fd), "rb") as f:
                text = f.read(1 << 20).decode(errors="replace")
        finally:
            os.close(fd)
        if any(entry.split(":")[2:3] == [str(number)] for entry in text.splitlines()):
            return
        fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=etc)
        with os.fdopen(fd, "ab") as f:
            f.write((("" if not text or text.endswith("\n") else "\n") + line).encode())
    except OSError:
        return
    finally:
        os.close(etc)


def resolve_in(root: Path, path: str) -> Path | None:
    """`path` (as the sandbox sees it) in the tree `root`, its symlinks followed inside
    `root`, never out to the host's files; None past 40 symlinks."""
    pending, done, hops = [p for p in path.split("/") if p], list[str](), 0
    while pending:
        part = pending.pop(0)
        if part in (".", ".."):
            if part == ".." and done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        done.append(part)
    return root.joinpath(*done)


def has_program(root: Path, path: str) -> bool:
    """Whether `path` (as the sandbox sees it) is an executable file in `root`."""
    found = resolve_in(root, path)
    return found is not None and found.is_file() and os.access(found, os.X_OK)


def login_shell(root: Path | None) -> str:
    """bash if the sandbox's root (`None`: the host's) has it, else sh."""
    if root is None:
        return "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
    return "/bin/bash" if has_program(root, "/bin/bash") else "/bin/sh"
