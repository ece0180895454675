"""Templates' root filesystems: a content-addressed store of read-only layers, and the
overlay mount that gives a sandbox one as `/` with its own writable layer on top.

Not wired into sandboxes or the API yet; docs/templates-plan.md says what comes next.
"""

from corral.images._overlay import mount_overlay, overlay_options, unmount_overlay
from corral.images._store import Layer, LayerStore, tree_digest

__all__ = [
    "Layer",
    "LayerStore",
    "mount_overlay",
    "overlay_options",
    "tree_digest",
    "unmount_overlay",
]
