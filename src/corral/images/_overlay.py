"""Overlay a template's layers under a sandbox's writable upper dir: the `/` it sees.

The layers are overlayfs lower dirs, never written; every write lands in `upper` (on
disk, not memory: its bound is the filesystem `upper` lives on). `work` is overlayfs's
scratch dir and must be on the same filesystem as `upper`.
"""

from __future__ import annotations

import ctypes
import os
import resource
from collections.abc import Sequence
from pathlib import Path

from corral.errors import InvalidRequest, SandboxStartFailed

_libc = ctypes.CDLL(None, use_errno=True)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 0x1, 0x2, 0x4
_MNT_DETACH = 0x2
# Characters overlayfs' option parser treats as separators or escapes.
_UNSAFE = (",", ":", "\\")


def _option_path(path: Path, what: str) -> str:
    text = str(path)
    if not path.is_absolute() or any(c in text for c in _UNSAFE):
        raise InvalidRequest(
            f"the overlay's {what} {text!r} must be an absolute path without ',', ':' or '\\'"
        )
    return text


def overlay_options(layers: Sequence[Path], upper: Path, work: Path) -> str:
    """The mount data for `layers` (bottom first, as an image lists them) under `upper`."""
    return _checked(
        f"{_lowerdir(layers)},upperdir={_option_path(upper, 'upper dir')},"
        f"workdir={_option_path(work, 'work dir')}",
        len(layers),
    )


def _lowerdir(layers: Sequence[Path]) -> str:
    if not layers:
        raise InvalidRequest("an overlay needs at least one layer")
    # overlayfs lists lower dirs top first.
    return "lowerdir=" + ":".join(_option_path(layer, "layer") for layer in reversed(layers))


def _checked(options: str, count: int) -> str:
    # The whole string must fit in one page (the mount(2) data argument).
    if len(options) >= resource.getpagesize():
        raise InvalidRequest(
            f"{count} layers are too many to overlay in one mount; flatten the template"
        )
    return options


def mount_overlay(layers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount `layers` with `upper` on top at `target` (nosuid, nodev)."""
    _mount(overlay_options(layers, upper, work), target, 0)


def mount_merged(layers: Sequence[Path], target: Path) -> None:
    """Mount `layers` read-only at `target` without an upper dir: their merged tree, in
    which whiteouts and opaque directories have done their work and show no more."""
    _mount(_checked(_lowerdir(layers), len(layers)), target, _MS_RDONLY)


def _mount(options: str, target: Path, flags: int) -> None:
    if _libc.mount(
        b"overlay", str(target).encode(), b"overlay", _MS_NOSUID | _MS_NODEV | flags,
        options.encode(),
    ):  # fmt: skip
        err = ctypes.get_errno()
        raise SandboxStartFailed(
            f"could not mount the template's layers at {target}: {os.strerror(err)} "
            "(overlayfs needs root or a user namespace on Linux 5.11+)"
        )


def unmount_overlay(target: Path, *, lazy: bool = False) -> None:
    """Unmount `target`; `lazy`: detach it now, the kernel ends it with its last user."""
    if _libc.umount2(str(target).encode(), _MNT_DETACH if lazy else 0):
        err = ctypes.get_errno()
        raise SandboxStartFailed(f"could not unmount {target}: {os.strerror(err)}")
