"""The sandbox engine of one host: create sandboxes on any tier, reap what crashes left.

A long-lived process (server, worker) also calls `start_reaper`: then what another process
left when it died is reaped while this one runs, not only when some Corral process starts.

async with Engine(Settings.from_env()) as engine:
    sandbox = await engine.create(template="host", limits=Limits(memory_mib=256))
    result = await sandbox.run(["echo", "hi"])
    await sandbox.destroy()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable, Mapping

from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import CapacityExceeded, CorralError, InvalidRequest, IsolationUnavailable
from corral.isolation import registry
from corral.isolation.admission import MemoryCapacity
from corral.isolation.backend import Backend, Capabilities, Entrypoint, SandboxSpec
from corral.isolation.cgroups import CgroupDriver
from corral.isolation.footprint import Footprint, orphans
from corral.isolation.limits import Limits
from corral.isolation.sandbox import Sandbox, SandboxState
from corral.isolation.templates import get_template

log = logging.getLogger("corral.isolation")


_GONE = SandboxState.DESTROYED
_SANDBOX_ID = re.compile(r"sb_[0-9a-f]{20}")


def new_sandbox_id() -> str:
    return "sb_" + secrets.token_hex(10)


class Engine:
    """Creates and tracks the sandboxes of this process; cleans up after dead ones."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.sandboxes: dict[str, Sandbox] = {}
        self._backends: dict[str, Backend] = {}
        self._cgroups: CgroupDriver | bool | None = False  # False: not probed yet
        self.memory_capacity = MemoryCapacity.of_host(self.settings)
        # Memory limits of the sandboxes being launched, admitted but not yet in `sandboxes`.
        self._launching: dict[str, int] = {}
        # Where idle sandboxes come from that may be destroyed to admit a real one (the
        # warm pools): each call hands one over, None when it has no more.
        self.spares: list[Callable[[], Sandbox | None]] = []
        self._reaper: asyncio.Task[None] | None = None
        self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.settings.runtime_dir, 0o711)  # sandboxes' uids traverse it
        self.reaped = self.reap()

    # -- host ----------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Capabilities]:
        return registry.capabilities(self.settings)

    def cgroups(self) -> CgroupDriver | None:
        if self._cgroups is False:
            try:
                self._cgroups = CgroupDriver.detect(self.settings.cgroup_parent)
            except IsolationUnavailable as exc:
                log.warning("sandboxes will run without cgroup limits: %s", exc)
                self._cgroups = None
        assert self._cgroups is not True
        return self._cgroups or None

    def backend(self, name: str | None = None) -> Backend:
        name = name or self.settings.isolation
        if name not in self._backends:
            backend = registry.resolve(name, self.settings)
            self._backends[name] = self._backends[backend.name] = backend
        return self._backends[name]

    def reap(self) -> int:
        """Remove what sandboxes of dead processes left: processes, cgroups, mounts, files."""
        count = 0
        for fp in orphans(self.settings.runtime_dir):
            if fp.cgroup is not None and (driver := self.cgroups()) is not None:
                cgroup = driver.open(fp.cgroup)
                if cgroup is not None:
                    cgroup.destroy()
            fp.release()
            count += 1
            log.info("reaped sandbox %s left by dead process %d", fp.id, fp.owner_pid)
        return count

    def start_reaper(self) -> None:
        """Reap every `settings.reap_interval` seconds until `aclose`, in a thread: reaping
        is blocking I/O (a cgroup's removal waits for its processes to die)."""
        interval = self.settings.reap_interval
        if interval <= 0:
            raise InvalidRequest(
                f"CORRAL_REAP_INTERVAL={interval} must be a positive number of seconds"
            )
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_every(interval), name="reaper")

    async def _reap_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.reap)
            except Exception:
                log.exception("reaping what dead processes left failed; trying again later")

    # -- sandboxes -----------------------------------------------------------------------

    async def create(
        self,
        template: str = "host",
        limits: Limits | None = None,
        network: str = "none",
        env: Mapping[str, str] | None = None,
        isolation: str | None = None,
        sandbox_id: str | None = None,
        entrypoint: Entrypoint | None = None,
        make_room: bool = True,
    ) -> Sandbox:
        """Start a sandbox; the caller owns it and must `destroy` it.

        The host admits it only if its memory limit fits (`MemoryCapacity`); to make it
        fit, spare sandboxes are destroyed, unless `make_room` is False (a spare itself):
        else CapacityExceeded.

        `sandbox_id` lets a caller that records the sandbox before it exists (the sandbox
        manager) choose the id; it must come from `new_sandbox_id()`. With `entrypoint`,
        a one-shot sandbox: it runs that command (`sandbox.entry`) instead of a guest
        agent, where the tier can (`Backend.entrypoints`).
        """
        spec = SandboxSpec(template, limits or Limits(), network, dict(env or {}))
        spec.limits.check_host()
        backend = self.backend(isolation)
        if entrypoint is not None and not backend.entrypoints:
            raise InvalidRequest(f"the {backend.name} tier cannot start one-shot sandboxes")
        get_template(spec.template)  # refuse an unknown template before creating anything
        driver = self.cgroups()
        if driver is None and backend.name != "process":
            raise IsolationUnavailable(
                f"the {backend.name} backend needs cgroups for its limits; run `corral doctor`"
            )
        self._forget_destroyed()
        sandbox_id = sandbox_id or new_sandbox_id()
        if (
            not _SANDBOX_ID.fullmatch(sandbox_id)
            or sandbox_id in self.sandboxes
            or sandbox_id in self._launching
        ):
            raise InvalidRequest(f"sandbox id {sandbox_id!r} is malformed or in use")
        await self._admit(spec.limits.memory_mib, make_room=make_room)
        # No await since the admission: the memory is taken before another create looks.
        self._launching[sandbox_id] = spec.limits.memory_mib
        try:
            footprint = Footprint.create(
                self.settings.runtime_dir,
                sandbox_id,
                backend.name,
                cgroup=sandbox_id if driver is not None else None,
            )
            sandbox = await Sandbox.launch(backend, spec, footprint, driver, entrypoint)
            self.sandboxes[sandbox.id] = sandbox
        finally:
            del self._launching[sandbox_id]
        return sandbox

    async def set_limits(self, sandbox: Sandbox, limits: Limits) -> None:
        """`sandbox.set_limits(limits)`, once the host admits its new memory limit."""
        if limits.memory_mib > sandbox.spec.limits.memory_mib:
            await self._admit(limits.memory_mib, resizing=sandbox)
        sandbox.set_limits(limits)

    def committed_memory_mib(self) -> int:
        """The memory limits of every live sandbox of this engine, those starting included."""
        live = (s.spec.limits.memory_mib for s in self.sandboxes.values() if s.state is not _GONE)
        return sum(live) + sum(self._launching.values())

    async def _admit(
        self, memory_mib: int, *, resizing: Sandbox | None = None, make_room: bool = True
    ) -> None:
        """Return once `memory_mib` more fits in the host's capacity (`resizing`'s current
        limit given back first), destroying spare sandboxes to make room if `make_room`;
        else raise CapacityExceeded. No await follows the last check: the caller takes
        the memory before another admission can look."""
        while True:
            committed = self.committed_memory_mib()
            if resizing is not None and resizing.state is not _GONE:
                committed -= resizing.spec.limits.memory_mib
            if committed + memory_mib <= self.memory_capacity.mib or not make_room:
                break
            spare = next((s for take in self.spares if (s := take()) is not None), None)
            if spare is None:
                break
            log.info("destroying a spare sandbox to make room", extra={"sandbox_id": spare.id})
            self.sandboxes.pop(spare.id, None)
            await spare.destroy()
        try:
            self.memory_capacity.check(memory_mib, committed)
        except CapacityExceeded as exc:
            if make_room:  # a real sandbox, not a spare: the operator may want more room
                log.info("sandbox refused: %s", exc)
            raise

    def _forget_destroyed(self) -> None:
        for sandbox_id in [
            k for k, s in self.sandboxes.items() if s.state is SandboxState.DESTROYED
        ]:
            del self.sandboxes[sandbox_id]

    async def destroy(self, sandbox_id: str) -> None:
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            raise CorralError(f"no sandbox {sandbox_id} in this engine")
        await sandbox.destroy()

    async def aclose(self) -> None:
        """Destroy every sandbox this engine created, then release what its tiers hold."""
        await stop_tasks(self._reaper)
        self._reaper = None
        live = list(self.sandboxes.values())
        self.sandboxes.clear()
        results = await asyncio.gather(*(s.destroy() for s in live), return_exceptions=True)
        for sandbox, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                log.error("could not destroy sandbox %s: %s", sandbox.id, result)
        backends = {id(b): b for b in self._backends.values()}.values()
        self._backends.clear()
        for backend in backends:
            await asyncio.to_thread(backend.close)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.aclose()
