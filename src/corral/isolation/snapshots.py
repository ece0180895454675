"""Snapshots: what a layer-template sandbox changed in its `/`, as one more layer.

The sandbox's upper dir (on its disk, `corral.isolation.rootfs`) holds every change: new
and modified files, overlay whiteouts (char 0/0) for what it deleted, opaque directories
for what it replaced. It is read as a canonical tar (`write_canonical`) while the sandbox
is frozen, so nothing changes under the reader and no directory on its way can turn into
a symlink. On the way out its whiteouts become OCI `.wh.` entries (`oci.oci_whiteouts`)
and its owners the ids the layers store (host id uid+x -> x, the inverse of the idmap its
layers are mounted with); on the way in the tar goes through the store's usual checks
(device nodes, setuid bits, privileged xattrs neutralised) and `oci.overlay_whiteouts`
turns the `.wh.` entries back. The new layer stacks on the template's as an overlay
lower dir exactly as the upper dir did.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from corral.errors import QuotaExceeded
from corral.images import Layer, LayerStore
from corral.images.oci import oci_whiteouts, overlay_whiteouts

# What an owner outside the sandbox's ids becomes (files Corral itself made as the host's
# root would be the only ones): nobody, never the host's id.
NOBODY = 65534


def _inside(host_id: int, base: int, count: int) -> int:
    return host_id - base if base <= host_id < base + count else NOBODY


def upper_layer(
    store: LayerStore, upper: Path, ids: tuple[int, int, int], max_bytes: int | None
) -> Layer:
    """Import the overlay upper dir `upper` (of a frozen sandbox whose layers map id x to
    host ids `ids` = (uid + x, gid + x) for x < count) into `store` as a layer."""
    uid, gid, count = ids

    def adjust(info: tarfile.TarInfo) -> list[tarfile.TarInfo]:
        info.uid, info.gid = _inside(info.uid, uid, count), _inside(info.gid, gid, count)
        return oci_whiteouts(info)

    try:
        return store.import_dir(upper, max_bytes=max_bytes, adjust=adjust, finish=overlay_whiteouts)
    except QuotaExceeded:
        raise QuotaExceeded(
            f"the sandbox changed more than {max_bytes} bytes of files; delete what the "
            "snapshot does not need, or ask for a larger template quota"
        ) from None
