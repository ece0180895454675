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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from corral import tracing
from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import (
    CapacityExceeded,
    CorralError,
    InvalidRequest,
    IsolationUnavailable,
    SandboxNotRunning,
)
from corral.isolation import registry
from corral.isolation.admission import MemoryCapacity, MemoryLedger
from corral.isolation.backend import Backend, Capabilities, Entrypoint, SandboxSpec
from corral.isolation.cgroups import CgroupDriver
from corral.isolation.footprint import Footprint, orphans
from corral.isolation.sandbox import Sandbox, SandboxState
from corral.isolation.templates import LayerTemplate, Templates
from corral.isolation.volumes import VolumeMount
from corral.limits import Limits
from corral.network.policy import NetworkPolicy

log = logging.getLogger("corral.isolation")

_SANDBOX_ID = re.compile(r"sb_[0-9a-f]{20}")


def new_sandbox_id() -> str:
    return "sb_" + secrets.token_hex(10)


class Spares(Protocol):
    """Idle sandboxes of this process that may be destroyed to admit a real one (a warm
    pool). Only this process's: the ledger counts other processes' spares too, but a
    process can destroy only its own sandboxes, so each makes room from its own pools."""

    def surrender(self) -> Sandbox | None:
        """One spare, now the engine's to destroy; None when there are no more."""

    def spare_mib(self) -> int:
        """The memory limits of the spares it holds."""


def _checkpoint_dir(path: Path | None) -> Path | None:
    """`path` made absolute if it is a directory (a checkpoint to restore), else an error."""
    if path is None:
        return None
    if not isinstance(path, Path) or not path.is_dir():
        raise InvalidRequest(
            f"restore={path!r} is not a directory; give the directory a checkpoint was "
            "written to (`Sandbox.checkpoint`)"
        )
    return path.resolve()


class Engine:
    """Creates and tracks the sandboxes of this process; cleans up after dead ones."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # built by the entry point: the engine reads no environment
        self._sandboxes: dict[str, Sandbox] = {}
        self._backends: dict[str, Backend] = {}
        self._loading: dict[str, asyncio.Future[Backend]] = {}  # `load`'s probes under way
        self._probing: asyncio.Future[dict[str, Capabilities]] | None = None
        self._cgroups: CgroupDriver | bool | None = False  # False: not probed yet
        self.memory_capacity = MemoryCapacity.of_host(self.settings)
        self._spares: list[Spares] = []  # the warm pools
        # `host` and the layer templates registered here (by the services, or a caller).
        self.templates = Templates()
        self._reaper: asyncio.Task[None] | None = None
        self.settings.runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.settings.runtime_dir, 0o711)  # sandboxes' uids traverse it
        self.ledger = MemoryLedger(self.settings.runtime_dir, self.memory_capacity)
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
        """The tier `name` (default: the settings'), probed on first use. On an event
        loop, `await load(name)` first: a first probe may take seconds (gvisor's and
        microvm's kvm trials), and this one would run on the loop."""
        name = name or self.settings.default_isolation
        if name not in self._backends:
            self._register(name, registry.resolve(name, self.settings))
        return self._backends[name]

    async def load(self, name: str | None = None) -> Backend:
        """`backend(name)`, its first probe run in a thread, so that the event loop goes
        on answering requests meanwhile; callers that ask at once share one probe."""
        name = name or self.settings.default_isolation
        if name in self._backends:
            return self._backends[name]
        loading = self._loading.get(name)
        if loading is None:
            probe = asyncio.to_thread(registry.resolve, name, self.settings)
            loading = self._loading[name] = asyncio.ensure_future(probe)
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        backend = await asyncio.shield(loading)
        if name not in self._backends:
            self._register(name, backend)
        return self._backends[name]

    async def load_capabilities(self) -> dict[str, Capabilities]:
        """`capabilities()`, probed in a thread (see `load`); the probes are cached per
        process, so the engine's later calls on the loop return at once."""
        if self._probing is None:
            self._probing = asyncio.ensure_future(
                asyncio.to_thread(registry.capabilities, self.settings)
            )
        return await asyncio.shield(self._probing)

    def _register(self, name: str, backend: Backend) -> None:
        # One instance per tier, whichever name ("auto" or its own) asked first: a
        # second one would hold spare disks that aclose never releases.
        if (first := self._backends.get(backend.name)) is not None:
            if first is not backend:
                backend.close()
            backend = first
        self._backends[name] = self._backends[backend.name] = backend

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
            log.info(
                "reaped sandbox left by a dead process",
                extra={"sandbox_id": fp.id, "owner_pid": fp.owner_pid},
            )
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

    @property
    def sandboxes(self) -> Mapping[str, Sandbox]:
        """This engine's sandboxes that are not destroyed, by id; read-only: `create` adds
        one and destroying it (`Sandbox.destroy`, by whoever owns it) takes it out."""
        self._forget_destroyed()
        return MappingProxyType(self._sandboxes)

    def check(
        self,
        template: str = "host",
        limits: Limits | None = None,
        network: NetworkPolicy | str = "none",
        env: Mapping[str, str] | None = None,
        isolation: str | None = None,
        entrypoint: Entrypoint | None = None,
        volumes: Sequence[VolumeMount] = (),
        ram_disk: bool = False,
        restore: Path | None = None,
    ) -> tuple[SandboxSpec, Backend]:
        """The spec and tier `create` would start with these arguments, or what it would
        raise before creating anything: bad input (InvalidRequest), a tier the host lacks
        or a feature the tier lacks (IsolationUnavailable, FAILED_PRECONDITION on the
        wire). A caller with records to write (the sandbox manager) asks first."""
        # An unknown template is refused before anything is created.
        resolved = self.templates.get(template)
        rootfs = resolved if isinstance(resolved, LayerTemplate) else None
        spec = SandboxSpec(
            template,
            limits or Limits(),
            NetworkPolicy.of(network),
            dict(env or {}),
            rootfs,
            tuple(volumes),
            ram_disk,
            _checkpoint_dir(restore),
        )
        spec.limits.check_host()
        backend = self.backend(isolation)
        if entrypoint is not None and not backend.entrypoints:
            raise IsolationUnavailable(
                f"the {backend.name} tier cannot start one-shot sandboxes; start one with a "
                "guest agent, or use the namespace tier"
            )
        if restore is not None:
            backend.check_checkpoint(spec, "restore a sandbox from a checkpoint")
            if entrypoint is not None:
                raise InvalidRequest(
                    "a one-shot sandbox cannot be restored from a checkpoint: "
                    "leave out the entrypoint"
                )
        self._check_features(
            backend, template, layered=rootfs is not None, network=spec.network,
            volumes=bool(spec.volumes),
        )  # fmt: skip
        return spec, backend

    def check_tier(
        self, isolation: str | None, template: str, network: NetworkPolicy, *, volumes: bool
    ) -> Backend:
        """What `check` says of the tier alone, for sandboxes of the layer template
        `template` (which need not exist yet) with `network` and volumes or not: a
        caller that records a definition before its template is built (`corral vm`)
        refuses it as its sandboxes would be. `await load(isolation)` first."""
        backend = self.backend(isolation)
        self._check_features(backend, template, layered=True, network=network, volumes=volumes)
        return backend

    def _check_features(
        self,
        backend: Backend,
        template: str,
        *,
        layered: bool,
        network: NetworkPolicy,
        volumes: bool,
    ) -> None:
        if layered and not backend.layer_templates:
            raise IsolationUnavailable(
                f"the {backend.name} tier cannot start sandboxes of the layer template "
                f"{template!r}; use the namespace tier"
            )
        if not layered and not backend.host_template:
            raise IsolationUnavailable(
                f"the {backend.name} tier cannot run the template {template!r} (the host's "
                "/usr, which it has no disk image of); use a layer template such as `base`"
            )
        if volumes and not backend.volumes:
            raise IsolationUnavailable(
                f"the {backend.name} tier cannot mount volumes; use the namespace tier"
            )
        backend.check_network(network)
        if self.cgroups() is None and backend.name != "process":
            raise IsolationUnavailable(
                f"the {backend.name} backend needs cgroups for its limits; run `corral doctor`"
            )

    @tracing.traced("engine.create")
    async def create(
        self,
        template: str = "host",
        limits: Limits | None = None,
        network: NetworkPolicy | str = "none",
        env: Mapping[str, str] | None = None,
        isolation: str | None = None,
        sandbox_id: str | None = None,
        entrypoint: Entrypoint | None = None,
        make_room: bool = True,
        volumes: Sequence[VolumeMount] = (),
        ram_disk: bool = False,
        restore: Path | None = None,
    ) -> Sandbox:
        """Start a sandbox; the caller owns it and must `destroy` it.

        The host admits it only if its memory limit fits (`MemoryCapacity`, counting the
        sandboxes of every process of the runtime dir); to make it fit, this process's
        spare sandboxes are destroyed, unless `make_room` is False (a spare itself): else
        CapacityExceeded.

        `sandbox_id` lets a caller that records the sandbox before it exists (the sandbox
        manager) choose the id; it must come from `new_sandbox_id()`. With `entrypoint`,
        a one-shot sandbox: it runs that command (`sandbox.entry`) instead of a guest
        agent, where the tier can (`Backend.entrypoints`). `ram_disk` puts a layer
        template's writable layer on a tmpfs (`SandboxSpec.ram_disk`).

        With `restore`, a directory `Sandbox.checkpoint` wrote, the sandbox is restored
        from it rather than booted (`SandboxSpec.restore`), on a tier with memory
        snapshots: its processes and files go on, its agent connection is new. Ask for
        the template, tier, limits, network and volumes it was created with. The
        directory stays the caller's (removing it once the sandbox runs is safe).
        """
        await self.load(isolation)  # a first probe off the event loop
        spec, backend = self.check(
            template, limits, network, env, isolation, entrypoint, volumes, ram_disk, restore
        )
        driver = self.cgroups()
        sandbox_id = sandbox_id or new_sandbox_id()
        if not _SANDBOX_ID.fullmatch(sandbox_id) or sandbox_id in self.sandboxes:
            raise InvalidRequest(f"sandbox id {sandbox_id!r} is malformed or in use")
        tracing.annotate(
            {
                tracing.SANDBOX_ID: sandbox_id,
                "corral.sandbox.tier": backend.name,
                "corral.sandbox.template": template,
                "corral.sandbox.restore": restore is not None,
            }
        )
        with tracing.span("engine.admit", {"corral.sandbox.memory_mib": spec.limits.memory_mib}):
            entry = await self._admit(sandbox_id, spec.limits.memory_mib, make_room=make_room)
        # No await since the admission: its ledger entry is in the footprint before this
        # task can be cancelled, and releasing the footprint gives the memory back.
        try:
            footprint = Footprint.create(
                self.settings.runtime_dir,
                sandbox_id,
                backend.name,
                cgroup=sandbox_id if driver is not None else None,
                memory_entry=entry,
            )
        except BaseException:
            os.unlink(entry)
            raise
        if (rootfs := spec.rootfs) is not None and rootfs.store is not None:
            try:  # UnknownLayer if the template's layers were removed since
                footprint.hold_layers(rootfs.store, rootfs.digests)
            except BaseException:
                footprint.release()
                raise
        sandbox = await Sandbox.launch(backend, spec, footprint, driver, entrypoint)
        self._sandboxes[sandbox.id] = sandbox
        return sandbox

    async def set_limits(self, sandbox: Sandbox, limits: Limits) -> None:
        """`sandbox.set_limits(limits)`, once the host admits its new memory limit."""
        footprint, old, new = sandbox.footprint, sandbox.spec.limits.memory_mib, limits.memory_mib
        assert footprint.memory_entry is not None  # every sandbox of an engine has one
        if new <= old:
            sandbox.set_limits(limits)
            if new < old:  # memory given back
                footprint.memory_entry = self.ledger.record(sandbox.id, new, footprint.memory_entry)
            return
        try:
            entry = await self._admit(sandbox.id, new, replacing=footprint.memory_entry)
        except FileNotFoundError:  # destroyed meanwhile: its entry went with its footprint
            raise SandboxNotRunning(f"sandbox {sandbox.id} is {sandbox.state}") from None
        footprint.memory_entry = entry
        try:
            sandbox.set_limits(limits)
        except BaseException:
            if sandbox.state is SandboxState.DESTROYED:
                # Its release (in a thread) may have read the entry's old name: remove it.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
            else:
                footprint.memory_entry = self.ledger.record(sandbox.id, old, entry)
            raise

    def add_spares(self, spares: Spares) -> None:
        """Count `spares` (a warm pool) as free memory that `create` may take back."""
        self._spares.append(spares)

    def remove_spares(self, spares: Spares) -> None:
        """Stop counting `spares` (a pool that closes); no error if it was not added."""
        with contextlib.suppress(ValueError):
            self._spares.remove(spares)

    def committed_memory_mib(self) -> int:
        """The memory limits of every live sandbox of the host (every Corral process of
        the runtime dir), those starting included."""
        return self.ledger.committed_mib()

    def check_room(self, memory_mib: int, *, resizing: Sandbox | None = None) -> None:
        """Raise CapacityExceeded now if `create` (or `set_limits` of `resizing`) would
        refuse `memory_mib` even after destroying this process's spares: a caller with
        records to write refuses before writing them. Only a hint (other processes admit
        meanwhile): `create` and `set_limits` check again under the ledger's lock."""
        free = self.free_memory_mib(excluding=resizing.id if resizing else None)
        self.memory_capacity.check(memory_mib, self.memory_capacity.mib - free)

    def free_memory_mib(self, *, excluding: str | None = None) -> int:
        """The memory `create` could admit now: the host's capacity less what its live
        sandboxes (of every process, but `excluding`) hold, this process's spares counted
        as free since `create` destroys them to make room. A hint: another process may
        take it meanwhile, and `create` checks again under the ledger's lock."""
        committed = self.ledger.committed_mib(excluding=excluding)
        committed -= sum(spares.spare_mib() for spares in self._spares)
        return self.memory_capacity.mib - max(committed, 0)

    async def _admit(
        self,
        sandbox_id: str,
        memory_mib: int,
        *,
        replacing: str | None = None,
        make_room: bool = True,
    ) -> str:
        """Enter `sandbox_id` holding `memory_mib` in the host's ledger (in place of its
        entry `replacing`) once that fits, destroying this process's spare sandboxes to
        make room if `make_room`; else raise CapacityExceeded. The new entry's path."""
        while True:
            try:
                return await self.ledger.admit(sandbox_id, memory_mib, replacing)
            except CapacityExceeded as exc:
                spare = None
                if make_room:
                    spares = (s for p in self._spares if (s := p.surrender()) is not None)
                    spare = next(spares, None)
                if spare is None:
                    if make_room:  # a real sandbox, not a spare: the operator may want more room
                        log.info("sandbox refused: %s", exc)
                    raise
            log.info("destroying a spare sandbox to make room", extra={"sandbox_id": spare.id})
            await spare.destroy()

    def _forget_destroyed(self) -> None:
        for sandbox_id in [
            k for k, s in self._sandboxes.items() if s.state is SandboxState.DESTROYED
        ]:
            del self._sandboxes[sandbox_id]

    async def destroy(self, sandbox_id: str) -> None:
        sandbox = self._sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            raise CorralError(f"no sandbox {sandbox_id} in this engine")
        await sandbox.destroy()

    async def aclose(self) -> None:
        """Destroy every sandbox this engine created, then release what its tiers hold."""
        await stop_tasks(self._reaper)
        self._reaper = None
        live = list(self._sandboxes.values())
        self._sandboxes.clear()
        results = await asyncio.gather(*(s.destroy() for s in live), return_exceptions=True)
        for sandbox, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                log.error(
                    "could not destroy sandbox",
                    extra={"sandbox_id": sandbox.id, "error": str(result)},
                )
        backends = {id(b): b for b in self._backends.values()}.values()
        self._backends.clear()
        for backend in backends:
            await asyncio.to_thread(backend.close)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.aclose()
