"""Named volumes on the host: ext4 image files, mounted into the sandboxes that use them.

A volume is a sparse ext4 image (`disks.format_disk`, with a journal: unlike a sandbox's
disk it outlives the host's crashes), so its size bound is its file system's own: ENOSPC
inside, the host's file system only sees the sparse file grow, and never more than its
size. Its owner (the team, in SQL) names its file; this module knows only files.

Attaching it to a sandbox (`attach`, as root):
1. Under an flock on the image (every process of the data dir takes it), the loop device
   that already backs the image is found, else one is configured (autoclear). ONE loop
   device per image, so ONE ext4 superblock: two loop devices on one file would be two
   file systems writing the same blocks. The kernel counts the mounts of that superblock:
   the loop device detaches itself when the last sandbox using it has gone, and a
   crashed process's mounts are unmounted by the reaper (each one is in its footprint),
   so no count of our own can drift.
2. Mounted (nosuid, nodev) at a place of the sandbox's footprint, then bound *idmapped*
   beside it with the sandbox's id range (`idrange`) and the first mount dropped: the
   volume stores the ids as the sandbox sees them (its top directory is `user`'s, 1000),
   like a template's layers. So every sandbox, whatever its uid slot, sees the same
   owners — `user` owns what any sandbox's `user` wrote, even two at once — without a
   chown of the tree on each attach (which would be slow, racy between two sandboxes,
   and would follow the sandbox's symlinks as the host's root).
3. bubblewrap binds that mount at the sandbox's path (`ro`: the mount is read-only too).

`in_use` tells whether any sandbox still has it mounted (a mounted block device refuses
an exclusive open), for deleting it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.errors import (
    InvalidRequest,
    NotFound,
    SandboxStartFailed,
    VolumeInUse,
)
from corral.isolation import idrange
from corral.isolation.disks import format_disk, mount_loop
from corral.isolation.footprint import Footprint
from corral.isolation.rootfs import _bind_idmapped
from corral.isolation.templates import SANDBOX_UID

_libc = ctypes.CDLL(None, use_errno=True)
_MS_NOSUID, _MS_NODEV, _MS_REMOUNT = 0x2, 0x4, 0x20
_MNT_DETACH = 2
_LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64 (232 bytes): lo_device and lo_inode first.
_LOOP_INFO64 = struct.Struct("=QQ216x")


@dataclass(frozen=True)
class VolumeMount:
    """A volume for a sandbox: its image file, where the sandbox sees it, read-only or not."""

    name: str
    image: Path
    path: str
    read_only: bool = False


# Where a volume may not go: the kernel's and the sandbox's own trees (the guest agent,
# the /etc the sandbox is given).
_RESERVED = ("/proc", "/dev", "/sys", "/.corral", "/etc")
MAX_VOLUMES = 16


def check_mounts(mounts: Sequence[VolumeMount]) -> tuple[VolumeMount, ...]:
    """The mounts, or InvalidRequest naming the first bad one (nothing is created)."""
    if len(mounts) > MAX_VOLUMES:
        raise InvalidRequest(
            f"{len(mounts)} volumes asked for; a sandbox takes at most {MAX_VOLUMES}"
        )
    seen: list[str] = []
    for mount in mounts:
        if not isinstance(mount, VolumeMount):
            raise InvalidRequest(f"volumes must be VolumeMount entries, got {mount!r}")
        path = mount.path
        parts = path.split("/")
        if (
            not path.startswith("/")
            or path == "/"
            or "\0" in path
            or len(path) > 4096
            or any(part in ("", ".", "..") for part in parts[1:])
        ):
            raise InvalidRequest(
                f"volume {mount.name!r}: mount path {path!r} must be an absolute path below / "
                "with no '.', '..' or empty parts and no trailing '/', e.g. /data"
            )
        for reserved in _RESERVED:
            if path == reserved or path.startswith(reserved + "/"):
                raise InvalidRequest(
                    f"volume {mount.name!r}: mount path {path!r} is under {reserved}, which "
                    f"the sandbox needs for itself; mount it elsewhere (e.g. /data)"
                )
        for other in seen:
            if _within(path, other) or _within(other, path):
                raise InvalidRequest(
                    f"volume {mount.name!r}: mount path {path!r} overlaps {other!r}, another "
                    "volume's; give each volume a path of its own, not one inside another"
                )
        seen.append(path)
    return tuple(mounts)


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent + "/")


def create_image(image: Path, size_bytes: int) -> None:
    """Make the volume's image (it must not exist): an empty ext4 file system."""
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    format_disk(image, size_bytes, journal=True, root_owner=SANDBOX_UID)


def delete_image(image: Path) -> None:
    """Remove the volume's image, unless a sandbox has it mounted (`VolumeInUse`)."""
    with _locked(image) as fd:
        if fd is None:
            return
        if _mounted(fd):
            raise VolumeInUse(
                f"volume {image.stem!r} is mounted by a running sandbox; kill the sandboxes "
                "that use it (or wait for their jobs to end), then delete it"
            )
        image.unlink()


def in_use(image: Path) -> bool:
    """Whether a sandbox (of any process on this host) has the volume mounted."""
    with _locked(image) as fd:
        return fd is not None and _mounted(fd)


def used_bytes(image: Path) -> int:
    """What the volume takes on the host's disk: the image's allocated blocks."""
    try:
        return os.stat(image).st_blocks * 512
    except FileNotFoundError:
        return 0


def attach(footprint: Footprint, index: int, volume: VolumeMount, first: int) -> Path:
    """Mount `volume` for the sandbox of `footprint` (its ids start at host id `first`);
    the mount to bind."""
    userns_of = idrange.range_userns(first, 0)
    places = footprint.path / "volumes"
    places.mkdir(mode=0o711, exist_ok=True)  # bubblewrap runs as the sandbox uid
    raw, target = places / f"{index}.raw", places / str(index)
    raw.mkdir(mode=0o700)
    target.mkdir(mode=0o700)
    try:
        with _locked(volume.image) as fd:
            if fd is None:
                raise NotFound(f"volume {volume.name!r} was deleted; create it again")
            footprint.record_mount(str(raw))
            _mount(fd, volume.image, raw)
    except BaseException:
        with contextlib.suppress(Exception):
            os.close(userns_of())
        raise
    userns = userns_of()
    try:
        footprint.record_mount(str(target))
        _bind_idmapped(raw, target, userns, read_only=volume.read_only)
    finally:
        os.close(userns)
        # The idmapped bind holds the file system now; only it is the sandbox's.
        _libc.umount2(str(raw).encode(), _MNT_DETACH)
    return target


@contextlib.contextmanager
def _locked(image: Path) -> Iterator[int | None]:
    """The image open and flocked (None: it does not exist, or was deleted meanwhile)."""
    try:
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield None
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            st, now = os.fstat(fd), os.stat(image)
        except FileNotFoundError:
            yield None
            return
        # Deleted (and maybe made again) while this waited for the lock: not this one.
        yield fd if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino) else None
    finally:
        os.close(fd)


def _loop_of(fd: int) -> str | None:
    """The loop device backing the image open at `fd`, if one does."""
    st = os.fstat(fd)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        device = f"/dev/{backing.parts[3]}"
        try:
            loop = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = fcntl.ioctl(loop, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
        except OSError:  # detached meanwhile
            continue
        finally:
            os.close(loop)
        if _LOOP_INFO64.unpack(info) == (st.st_dev, st.st_ino):
            return device
    return None


def _mounted(fd: int) -> bool:
    device = _loop_of(fd)
    if device is None:
        return False
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno == errno.EBUSY
    return False


def _mount(fd: int, image: Path, target: Path) -> None:
    """Mount the image at `target`: through its loop device when it has one (the same
    superblock again), else through a new one."""
    for _ in range(50):
        device = _loop_of(fd)
        if device is None:
            mount_loop(image, target)
            # Deleting files gives their blocks back to the host's disk (the loop device
            # punches holes in the image): what a volume takes is what it holds now.
            if _libc.mount(None, str(target).encode(), None,
                           _MS_REMOUNT | _MS_NOSUID | _MS_NODEV, b"discard"):  # fmt: skip
                err = ctypes.get_errno()
                _libc.umount2(str(target).encode(), _MNT_DETACH)
                raise SandboxStartFailed(f"could not mount the volume: {os.strerror(err)}")
            return
        if not _libc.mount(device.encode(), str(target).encode(), b"ext4",
                           _MS_NOSUID | _MS_NODEV, None):  # fmt: skip
            return
        # Its last user just went: the device is letting go; a new one only once it has
        # (else two file systems at once on one image).
        time.sleep(0.02)
    raise SandboxStartFailed(
        f"could not mount the volume {image.stem!r}: its loop device is still busy; try again"
    )
