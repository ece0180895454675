"""Flatten: the merged tree of a stack of layers as one layer (wrenn's FlattenRootfs).

The layers are mounted read-only as one overlay with no upper dir, so overlayfs itself
applies their whiteouts and opaque directories (no second implementation of them here),
and that merged tree is imported like any directory: the layer has no whiteouts, and a
file deleted in an upper layer is simply absent. A template of one layer mounts faster
than one of many and is what a microVM's disk image is made from.
"""

from __future__ import annotations

from collections.abc import Sequence

from corral.errors import InvalidRequest, QuotaExceeded
from corral.images._overlay import mount_merged, unmount_overlay
from corral.images._store import Layer, LayerStore


def flatten(store: LayerStore, digests: Sequence[str], *, max_bytes: int | None = None) -> Layer:
    """Store the merged tree of the layers `digests` (bottom first, all in `store`) as one
    layer. QuotaExceeded past `max_bytes` of file data, with nothing stored."""
    if max_bytes is not None and max_bytes < 0:
        raise InvalidRequest(f"max_bytes={max_bytes} must be a number of bytes, 0 or more")
    layers = [store.get(digest).path for digest in digests]  # UnknownLayer, InvalidRequest
    with store.staging() as scratch:
        merged = scratch / "merged"
        merged.mkdir()
        mount_merged(layers, merged)
        try:
            return store.import_dir(merged, max_bytes=max_bytes)
        except QuotaExceeded:
            raise QuotaExceeded(
                f"the merged layers hold more than {max_bytes} bytes of files; "
                "ask for a larger template quota"
            ) from None
        finally:
            # Lazily: nothing of ours uses it any more; staging's removal must not cross it.
            unmount_overlay(merged, lazy=True)
