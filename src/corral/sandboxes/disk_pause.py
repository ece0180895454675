"""Pausing a sandbox to disk: nothing of it runs and its memory is the host's again.

On a tier with memory snapshots (gvisor, microvm) the whole sandbox is kept: `checkpoint`
writes its memory, processes and files (`Sandbox.checkpoint`) to
`<data_dir>/paused/<id>.checkpoint/`, and resuming restores it from there
(`Engine.create(restore=...)`): its processes go on where they were, only the streams of
commands running at the pause end. On other tiers only its filesystem is kept (`save`):

A frozen pause (`Sandbox.pause`) keeps every process in memory. A pause to disk (E2B's
`pause(keep_memory=False)`) instead snapshots the sandbox's `/` (`Sandbox.snapshot`: its
template's layers and one of its changes), then destroys the engine sandbox: nothing of
it runs and its cgroup is gone. What resuming needs (the layers and its template's
user, environment, working directory and start command) is written to
`<data_dir>/paused/<id>.json`, and the layers are held in the layer store under
`paused.<id>` (so `collect` keeps them): both outlive the server process, so a server
started later adopts the sandbox, still paused. Resuming boots a new engine sandbox with
the same id from those layers as its creation did (limits, network, environment,
volumes), then lets the layers go (the new sandbox holds them). Its files are all there;
its processes are not, and its kernel boot id is new, as after a reboot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import SnapshotUnavailable
from corral.images import LayerStore
from corral.isolation import Sandbox
from corral.isolation.templates import Templates

log = logging.getLogger("corral.sandboxes")

PREFIX = "paused."


def directory(data_dir: Path) -> Path:
    return data_dir / "paused"


@dataclass(frozen=True)
class DiskImage:
    """The filesystem of a sandbox paused to disk and what its timers do once resumed."""

    sandbox_id: str
    digests: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str = "root"
    start: str | None = None
    ready: str | None = None
    on_timeout: str = "kill"
    pause_keeps_memory: bool = True
    # A checkpoint of the whole sandbox (`checkpoint_dir`), not its filesystem's layers.
    memory: bool = False

    @property
    def holder(self) -> str:
        return PREFIX + self.sandbox_id

    def path(self, data_dir: Path) -> Path:
        return directory(data_dir) / f"{self.sandbox_id}.json"

    def checkpoint_dir(self, data_dir: Path) -> Path:
        return directory(data_dir) / f"{self.sandbox_id}.checkpoint"

    def write(self, data_dir: Path) -> None:
        """Write it whole or not at all (a crash leaves the old file or none)."""
        path = self.path(data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(self)))
        os.replace(partial, path)

    @classmethod
    def read(cls, data_dir: Path, sandbox_id: str) -> DiskImage | None:
        """The image of a sandbox paused to disk, or None (none, or unreadable)."""
        path = directory(data_dir) / f"{sandbox_id}.json"
        try:
            raw: dict[str, Any] = json.loads(path.read_text())
            raw["digests"] = tuple(raw["digests"])
            return cls(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("unreadable paused sandbox", extra={"path": str(path), "error": str(exc)})
            return None

    async def boot(
        self, templates: Templates, layers: LayerStore, start: Callable[[str], Awaitable[Sandbox]]
    ) -> Sandbox:
        """A new engine sandbox of its filesystem: `start(template)` with it registered
        as a template for the while."""
        name = self.holder
        templates.add(
            name,
            layers,
            self.digests,
            env=self.env,
            workdir=self.workdir,
            user=self.user,
            start=self.start,
            ready=self.ready,
        )
        try:
            return await start(name)
        finally:
            templates.remove(name)  # a sandbox started holds its layers itself

    def drop(self, layers: LayerStore | None, data_dir: Path) -> None:
        """Let its layers (or checkpoint) go and forget it (after a resume, or when it is
        killed)."""
        if layers is not None:
            for digest in self.digests:
                layers.release(digest, self.holder)
        self.path(data_dir).unlink(missing_ok=True)
        if self.memory:
            shutil.rmtree(self.checkpoint_dir(data_dir), ignore_errors=True)


async def save(
    sandbox: Sandbox,
    layers: LayerStore,
    data_dir: Path,
    max_bytes: int | None,
    *,
    on_timeout: str,
    pause_keeps_memory: bool,
) -> DiskImage:
    """Freeze `sandbox` and keep its `/` as a DiskImage, leaving it frozen (the caller
    destroys it). On any error it is thawed and nothing is kept."""
    rootfs = sandbox.spec.rootfs
    if rootfs is None:
        raise SnapshotUnavailable(
            f"sandbox {sandbox.id} runs the template {sandbox.spec.template!r}, whose root is "
            "the host's, not layers: it cannot be paused to disk; pause it with its memory "
            "(keep_memory=true) or kill it"
        )
    await sandbox.pause()  # its processes stop writing before its changes are read
    image: DiskImage | None = None
    try:
        digests = await sandbox.snapshot(layers, max_bytes=max_bytes)
        image = DiskImage(
            sandbox.id,
            tuple(digests),
            dict(rootfs.env),
            rootfs.workdir,
            rootfs.user,
            rootfs.start,
            rootfs.ready,
            on_timeout,
            pause_keeps_memory,
        )
        for digest in digests:
            layers.reference(digest, image.holder)
        image.write(data_dir)
    except BaseException:
        if image is not None:
            image.drop(layers, data_dir)
        with contextlib.suppress(Exception):
            await sandbox.resume()
        raise
    return image


async def checkpoint(
    sandbox: Sandbox, data_dir: Path, *, on_timeout: str, pause_keeps_memory: bool
) -> DiskImage:
    """Write `sandbox` whole under `data_dir` (`Sandbox.checkpoint`, which destroys it)
    and keep it as a DiskImage. Refused before anything changes where its tier cannot
    checkpoint it; once its agent has let go of its calls, a failure destroys it too."""
    image = DiskImage(
        sandbox.id, (), on_timeout=on_timeout, pause_keeps_memory=pause_keeps_memory, memory=True
    )
    path = image.checkpoint_dir(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Left by a server that died while checkpointing (the record is written after).
    shutil.rmtree(path, ignore_errors=True)
    await sandbox.checkpoint(path)
    try:
        image.write(data_dir)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return image
