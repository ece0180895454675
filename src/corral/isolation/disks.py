"""Sandbox disks: sparse ext4 image files, a few formatted and mounted ahead.

A layer template's sandbox writes to a disk of its own (`corral.isolation.rootfs`). Its
image is a sparse file of the sandbox's `disk_mib` (the host's file system holds only what
is written), formatted without a journal (a sandbox's disk does not outlive a host crash)
and with lazy inode tables, so mkfs writes almost nothing. mkfs is still a process
(~4-8 ms) and the loop device and mount cost 2-9 ms more on a busy host, so `DiskSpares`
keeps `keep` disks of each size asked for formatted *and mounted*, with the overlay's
directories made, in a background thread. Each spare is recorded in a footprint of its own
(`spare_…`), so the reaper unmounts and removes it if this process dies; taking one renames
its image, binds its mount where the sandbox wants it and releases that footprint.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import struct
import subprocess
import threading
from pathlib import Path

from corral.errors import SandboxStartFailed
from corral.isolation.footprint import Footprint

log = logging.getLogger("corral.isolation")
_libc = ctypes.CDLL(None, use_errno=True)
_MS_NOSUID, _MS_NODEV = 0x2, 0x4
_LOOP_CTL_GET_FREE, _LOOP_CONFIGURE, _LO_FLAGS_AUTOCLEAR = 0x4C82, 0x4C0A, 4
# struct loop_config: fd, block_size, struct loop_info64 (lo_flags at byte 52 of its 232),
# 8 reserved u64s.
_LOOP_CONFIG = struct.Struct("=II52xI176x64x")
# The directories of a sandbox's disk: (name, mode); `rootfs` gives them to its root.
DISK_DIRS = (("upper", 0o755), ("work", 0o700), ("shm", 0o1777))


def format_disk(
    image: Path, size_bytes: int, *, journal: bool = False, root_owner: int = 0
) -> None:
    """Make `image` (it must not exist): a sparse ext4 file system of `size_bytes`, with a
    journal only when it must survive a crash of the host (a volume's), its top directory
    owned by `root_owner` (uid and gid)."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    options = (
        f"lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner={root_owner}:{root_owner}"
    )
    done = subprocess.run(
        # -m 0: no reserved blocks, the whole size is the sandbox's. Lazy inode tables and
        # journal: the file is new and sparse, so what mkfs would zero reads as zeros.
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "has_journal" if journal else "^has_journal",
         "-E", options, str(image)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        raise SandboxStartFailed(f"could not format a sandbox disk: {done.stderr.strip()[-300:]}")


def prepare_disk(image: Path, target: Path) -> None:
    """Mount the formatted `image` at `target` (an empty directory) and make its
    directories (`DISK_DIRS`), owned by the host's root until a sandbox takes it."""
    mount_loop(image, target)
    make_disk_dirs(target)


def make_disk_dirs(target: Path) -> None:
    """The directories of a sandbox's disk (`DISK_DIRS`) in the file system at `target`."""
    for name, mode in DISK_DIRS:
        (target / name).mkdir()
        os.chmod(target / name, mode)


class DiskSpares:
    """Formatted and mounted disks ready to take, `keep` of each size asked for, owned
    by this process (recorded under `runtime_dir`)."""

    def __init__(self, directory: Path, runtime_dir: Path, keep: int = 2) -> None:
        self._directory = directory
        self._runtime_dir = runtime_dir
        self._keep = keep
        self._lock = threading.Lock()
        self._filling: set[int] = set()
        self._ready: dict[int, list[Footprint]] = {}
        self._retired: list[Footprint] = []  # taken: their own mounts to release
        self._closed = False

    def take(self, image: Path, size_bytes: int, target: Path) -> None:
        """Put a formatted disk of `size_bytes` at `image`, mounted at `target` (an empty
        directory) with `DISK_DIRS` made: a spare if one is ready, else one made now;
        then make spares of that size again, in the background. The caller has recorded
        `image` and the mount at `target` in its footprint."""
        image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            ready = self._ready.get(size_bytes)
            spare = ready.pop() if ready else None
        if spare is None:
            format_disk(image, size_bytes)
            prepare_disk(image, target)
        else:
            try:
                assert spare.disk is not None
                os.rename(spare.disk, image)
                spare.disk = None  # the sandbox's now: its footprint removes it
                _bind(spare.path / "disk", target)
            except BaseException:
                spare.release()
                raise
            # Its own mount goes (the sandbox's bind stays) in the background, with the
            # next spare's making: an unmount and a directory removal off the start.
            with self._lock:
                self._retired.append(spare)
        self._refill(size_bytes)

    def close(self) -> None:
        """Unmount and remove the spares (and make no more)."""
        with self._lock:
            self._closed = True
            spares = [fp for ready in self._ready.values() for fp in ready] + self._retired
            self._ready.clear()
            self._retired.clear()
        for spare in spares:
            spare.release()

    def _refill(self, size_bytes: int) -> None:
        with self._lock:
            if size_bytes in self._filling or self._closed:
                return
            self._filling.add(size_bytes)
        threading.Thread(
            target=self._fill, args=(size_bytes,), name="disk-spares", daemon=True
        ).start()

    def _fill(self, size_bytes: int) -> None:
        try:
            while True:
                with self._lock:
                    retired, self._retired = self._retired, []
                for spare in retired:
                    spare.release()
                with self._lock:
                    if self._closed or len(self._ready.get(size_bytes, ())) >= self._keep:
                        return
                name = f"spare_{secrets.token_hex(10)}"
                spare = Footprint.create(self._runtime_dir, name, "disk")
                try:
                    image = self._directory / f"{name}.img"
                    spare.record_mounts([str(spare.path / "disk")], disk=str(image))
                    self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    format_disk(image, size_bytes)
                    (spare.path / "disk").mkdir(mode=0o700)
                    prepare_disk(image, spare.path / "disk")
                except BaseException:
                    spare.release()
                    raise
                with self._lock:
                    if not self._closed:
                        self._ready.setdefault(size_bytes, []).append(spare)
                        continue
                spare.release()
                return
        except Exception:
            log.exception("could not make spare sandbox disks; sandboxes make their own")
        finally:
            with self._lock:
                self._filling.discard(size_bytes)


_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429  # x86_64 and arm64 alike
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _MOVE_MOUNT_F_EMPTY_PATH, _AT_FDCWD = 1, 0x1000, 0x4, -100


def _bind(source: Path, target: Path) -> None:
    """Bind the mount at `source` to `target` (open_tree + move_mount: works whatever the
    propagation of `source`'s parent, which a move would not)."""
    syscall = _libc.syscall
    tree = syscall(_SYS_OPEN_TREE, _AT_FDCWD, str(source).encode(), _OPEN_TREE_CLONE | os.O_CLOEXEC)
    if tree < 0:
        err = ctypes.get_errno()
        raise SandboxStartFailed(f"could not take a spare disk: {os.strerror(err)}")
    try:
        moved = syscall(
            _SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, str(target).encode(), _MOVE_MOUNT_F_EMPTY_PATH
        )
        if moved < 0:
            err = ctypes.get_errno()
            raise SandboxStartFailed(f"could not mount a spare disk: {os.strerror(err)}")
    finally:
        os.close(tree)


def mount_loop(image: Path, target: Path) -> None:
    """Mount the ext4 `image` at `target` (nosuid, nodev) through a free loop device that
    detaches itself once unmounted (autoclear). In-process: `mount -o loop` costs ~10 ms."""
    image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(64):  # another process may take the free device first
                number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
                loop = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    config = _LOOP_CONFIG.pack(image_fd, 0, _LO_FLAGS_AUTOCLEAR)
                    try:
                        fcntl.ioctl(loop, _LOOP_CONFIGURE, config)
                    except OSError as exc:
                        if exc.errno == errno.EBUSY:
                            continue
                        raise
                    if _libc.mount(
                        f"/dev/loop{number}".encode(), str(target).encode(), b"ext4",
                        _MS_NOSUID | _MS_NODEV, None,
                    ):  # fmt: skip
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                    return  # closing `loop` leaves the mount its only user
                finally:
                    os.close(loop)
            raise OSError(errno.EBUSY, "no free loop device")
        finally:
            os.close(control)
    except OSError as exc:
        raise SandboxStartFailed(f"could not mount the sandbox's disk: {exc}") from exc
    finally:
        os.close(image_fd)
