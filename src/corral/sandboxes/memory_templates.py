"""Memory templates: a template's sandboxes restored with its start command already run.

A template with a start command (a Jupyter kernel, a warmed interpreter, a web app) is
started once per image and checkpointed with it running and its ready check passed; each
later create of it on a tier with memory snapshots (gvisor, microvm) restores that image
instead of booting and running the start command again (E2B snapshots a template's
sandbox the same way once its start command is ready).

When an image is made: on the first create that can use it, not at build. What a
restore must match is known only at create — the tier, and the limits and network mode
the tier bakes into the machine (microvm: its memory and CPUs; gvisor: the rlimits of the
restored processes) — and a build names none of them; an image made on demand costs disk
only for what is used. That first create pays for it: a sandbox of the template (a
neutral one: its own id, no create's environment) runs the start command and its ready
check, is checkpointed into the image (`Sandbox.checkpoint`), and the create restores
from it like every later one.

Where: `<data_dir>/memory-templates/<team>/<template row id>/<key>/`, `key` a digest of
what must match (`image_key`), beside it `<key>.json` saying what it is for. A template
row is one build of one team's template, so an image is never another team's nor another
version's; deleting the template or replacing it with a rebuild removes its row's images
(`remove`). They survive a server restart (they are files).

What a restored sandbox cannot change from its image, so a create asking for it starts
cold (`restorable` says why): environment variables given at create (the start command
read the image's, which are the template's alone), volumes (not in the image), and a
network mode the tier cannot checkpoint. What it does get of its own: its id, its
/etc/hostname and /etc/hosts, its create's environment in every command it runs later,
its limits and network. gVisor restores the kernel's host name (`uname -n`) with the
image and its root may not change it: there it stays the name of the sandbox that made
the image (none other has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.errors import CorralError
from corral.limits import Limits

log = logging.getLogger("corral.sandboxes")

ROOT = "memory-templates"
_PARTIAL = ".partial-"
# A partial image older than this was left by a process that died making it.
_STALE = 3600.0


@dataclass(frozen=True)
class MemoryImage:
    """One image of a template: for which tier, limits, network mode and RAM disk."""

    tier: str
    memory_mib: int
    cpu: float
    network: str
    ram_disk: bool
    limits: dict[str, float | int]
    created_at: float
    size_bytes: int = 0


def image_key(tier: str, limits: Limits, network: str, ram_disk: bool) -> str:
    """What a restore must match, as a directory name: the tier, every limit (microvm
    bakes memory, CPUs and disk into the machine, gvisor the restored processes'
    rlimits), the network mode and whether the writable layer is in RAM."""
    what = {"tier": tier, "limits": asdict(limits), "network": network, "ram_disk": ram_disk}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def template_dir(data_dir: Path, team_id: str, template_id: str) -> Path:
    return data_dir / ROOT / team_id / template_id


def images(data_dir: Path, team_id: str, template_id: str) -> list[MemoryImage]:
    """The memory images of one template row, oldest first."""
    found = []
    folder = template_dir(data_dir, team_id, template_id)
    for meta in folder.glob("*.json") if folder.is_dir() else ():
        try:
            raw = json.loads(meta.read_text())
            found.append(MemoryImage(**raw))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("unreadable memory image record", extra={"path": str(meta), "error": exc})
    return sorted(found, key=lambda image: image.created_at)


def remove(data_dir: Path, template_id: str) -> None:
    """Remove every image of a template row (deleted, or replaced by a rebuild)."""
    for folder in (data_dir / ROOT).glob(f"*/{template_id}"):
        shutil.rmtree(folder, ignore_errors=True)


def _size(path: Path) -> int:
    # Allocated bytes: a microvm's disk images are sparse.
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


class MemoryImages:
    """The memory images of one server process's templates, made one at a time per key."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._locks: dict[Path, asyncio.Lock] = {}
        # Images whose making failed in this process (a checkpoint the tier refused
        # midway): their creates start cold, without paying for another attempt.
        self._unmakeable: set[Path] = set()
        self._sweep()

    def _sweep(self) -> None:
        """Remove partial images a process that died while making them left."""
        now = time.time()
        for partial in (self.data_dir / ROOT).glob(f"*/*/*{_PARTIAL}*"):
            with contextlib.suppress(OSError):
                if now - partial.stat().st_mtime > _STALE:
                    shutil.rmtree(partial, ignore_errors=True)

    async def image(
        self,
        team_id: str,
        template_id: str,
        key: str,
        what: MemoryImage,
        make: Callable[[Path], Awaitable[None]],
        retry: tuple[type[BaseException], ...] = (),
    ) -> tuple[Path, bool] | None:
        """The image `key` (`image_key`) of the team's template row, made now by
        `make(directory)` (which checkpoints a sandbox into that new directory) if there
        is none yet, and recorded as `what`; and whether it was made now. Creates of the
        same key wait for the one making it. None once making it failed in this process
        but for the errors in `retry` (which are raised, and tried again next time)."""
        folder = template_dir(self.data_dir, team_id, template_id)
        path = folder / key
        lock = self._locks.setdefault(path, asyncio.Lock())
        async with lock:
            if path.is_dir():
                return path, False
            if path in self._unmakeable:
                return None
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{key}{_PARTIAL}{secrets.token_hex(4)}"
            try:
                try:
                    await make(partial)
                except retry:
                    raise
                except CorralError as exc:
                    log.warning("no memory image of the template; its creates start cold: %s", exc)
                    self._unmakeable.add(path)
                    return None
                size = await asyncio.to_thread(_size, partial)
                record = MemoryImage(**{**asdict(what), "size_bytes": size})
                meta = folder / f"{key}.json"
                staged = meta.with_suffix(".json.partial")
                staged.write_text(json.dumps(asdict(record)))
                os.rename(partial, path)  # whole or not at all, then said to exist
                os.replace(staged, meta)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            log.info(
                "memory image made",
                extra={"template": template_id, "tier": what.tier, "size_bytes": size},
            )
            return path, True
