"""Sandbox disks: sparse ext4 image files, a few formatted ahead in the background.

A layer template's sandbox writes to a disk of its own (`corral.isolation.rootfs`). Its
image is a sparse file of the sandbox's `disk_mib` (the host's file system holds only what
is written), formatted without a journal (a sandbox's disk does not outlive a host crash)
and with lazy inode tables, so mkfs writes almost nothing. mkfs is still a process
(~4-8 ms), so `DiskSpares` keeps `keep` formatted images of each size asked for in
DIR/spare/SIZE/, taken by an atomic rename (processes sharing the data dir never take the
same one) and made again in a background thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import subprocess
import threading
from pathlib import Path

from corral.errors import SandboxStartFailed

log = logging.getLogger("corral.isolation")


def format_disk(image: Path, size_bytes: int, *, journal: bool = False) -> None:
    """Make `image` (it must not exist): a sparse ext4 file system of `size_bytes`, with a
    journal only when it must survive a crash of the host (a volume's)."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)
    done = subprocess.run(
        # -m 0: no reserved blocks, the whole size is the sandbox's. Lazy inode tables and
        # journal: the file is new and sparse, so what mkfs would zero reads as zeros.
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "has_journal" if journal else "^has_journal",
         "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0", str(image)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        raise SandboxStartFailed(f"could not format a sandbox disk: {done.stderr.strip()[-300:]}")


class DiskSpares:
    """Formatted disk images ready to take, `keep` of each size asked for."""

    def __init__(self, directory: Path, keep: int = 2) -> None:
        self._spare = directory / "spare"
        self._keep = keep
        self._lock = threading.Lock()
        self._filling: set[int] = set()

    def take(self, image: Path, size_bytes: int) -> None:
        """Put a formatted disk of `size_bytes` at `image`: a spare if one is ready, else
        one formatted now; then make spares of that size again, in the background."""
        image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._keep > 0:
            for spare in self._spares(size_bytes):
                try:
                    os.rename(spare, image)
                    break
                except FileNotFoundError:  # another process took it first
                    continue
            else:
                format_disk(image, size_bytes)
            self._refill(size_bytes)
        else:
            format_disk(image, size_bytes)

    def _spares(self, size_bytes: int) -> list[Path]:
        directory = self._spare / str(size_bytes)
        with contextlib.suppress(FileNotFoundError):
            return sorted(directory.glob("*.img"))
        return []

    def _refill(self, size_bytes: int) -> None:
        with self._lock:
            if size_bytes in self._filling:
                return
            self._filling.add(size_bytes)
        threading.Thread(
            target=self._fill, args=(size_bytes,), name="disk-spares", daemon=True
        ).start()

    def _fill(self, size_bytes: int) -> None:
        directory = self._spare / str(size_bytes)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            while len(self._spares(size_bytes)) < self._keep:
                # Formatted under a name `take` does not list, then renamed: whole or absent.
                staging = directory / f"{secrets.token_hex(8)}.partial"
                format_disk(staging, size_bytes)
                os.rename(staging, staging.with_suffix(".img"))
        except Exception:
            log.exception("could not format spare sandbox disks; sandboxes format their own")
        finally:
            with self._lock:
                self._filling.discard(size_bytes)
