"""Pausing a sandbox to disk: its filesystem kept, its processes and memory let go.

A frozen pause (`Sandbox.pause`) keeps every process in memory. A pause to disk (E2B's
`pause(keep_memory=False)`) instead snapshots the sandbox's `/` (`Sandbox.snapshot`: its
template's layers and one of its changes) into a hidden engine template named after the
sandbox, then destroys the engine sandbox: nothing of it runs and its cgroup is gone.
Resuming boots a new engine sandbox with the same id from that template, as its
creation did (limits, network, environment, volumes, user, start command), then drops
the template (the new sandbox holds its layers). Its files are all there; its processes
are not, and its kernel boot id is new, as after a reboot.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from corral.errors import SnapshotUnavailable
from corral.images import LayerStore
from corral.isolation import Sandbox
from corral.isolation.templates import Templates

log = logging.getLogger("corral.sandboxes")

PREFIX = "paused."


@dataclass(frozen=True)
class DiskImage:
    """The filesystem of a sandbox paused to disk: an engine template (which holds its
    layers in the layer store, so `collect` keeps them)."""

    templates: Templates
    template: str

    def drop(self) -> None:
        """Forget the template and release its layers; a no-op once done."""
        if self.template in self.templates.names():
            self.templates.remove(self.template)


async def save(
    sandbox: Sandbox, templates: Templates, layers: LayerStore, max_bytes: int | None
) -> DiskImage:
    """Freeze `sandbox`, keep its `/` as the template `paused.<id>`, and leave it frozen
    (the caller destroys it). On any error it is thawed and nothing is kept."""
    rootfs = sandbox.spec.rootfs
    if rootfs is None:
        raise SnapshotUnavailable(
            f"sandbox {sandbox.id} runs the template {sandbox.spec.template!r}, whose root is "
            "the host's, not layers: it cannot be paused to disk; pause it with its memory "
            "(keep_memory=true) or kill it"
        )
    await sandbox.pause()  # its processes stop writing before its changes are read
    try:
        digests = await sandbox.snapshot(layers, max_bytes=max_bytes)
        name = PREFIX + sandbox.id
        templates.add(
            name,
            layers,
            digests,
            env=rootfs.env,
            workdir=rootfs.workdir,
            user=rootfs.user,
            start=rootfs.start,
            ready=rootfs.ready,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await sandbox.resume()
        raise
    return DiskImage(templates, name)
