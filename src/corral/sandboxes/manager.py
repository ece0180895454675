"""The sandbox manager: teams' sandboxes on top of the engine, with durable state.

    creating ──► running ◄──► paused
        │           │            │
        └──► failed └──► killed ◄┘        (and running/paused ──► failed on a crash)

A pause freezes the sandbox (memory kept) or saves it to disk (`disk_pause`: files kept,
processes and memory let go; resume boots it afresh; it outlives its deadline and this
process). Every change of state is written with its event before the call returns. A team sees
only its own sandboxes: another team's id gets the same NotFound as an unknown one.
The manager is the only door to a live sandbox: its commands go through
`manager.commands`, its files through `manager.files`, each a check of the team and the
state away from the engine's sandbox.
Background loops enforce lifetimes and inactivity TTLs (every `tick`), sample metrics
(every `metrics_interval`) and keep the warm pools full (one per tier and template).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from corral import logs, tracing
from corral._aio import stop_tasks
from corral.config import Settings
from corral.errors import (
    CapacityExceeded,
    CorralError,
    Forbidden,
    InvalidRequest,
    IsolationUnavailable,
    NotFound,
    SandboxNotRunning,
    SandboxStartFailed,
    SnapshotUnavailable,
    Unauthenticated,
)
from corral.images import LayerStore
from corral.isolation import Engine, Sandbox
from corral.isolation.engine import new_sandbox_id
from corral.isolation.sandbox import SandboxState
from corral.isolation.templates import get_template
from corral.isolation.volumes import VolumeMount
from corral.network.policy import NetworkPolicy
from corral.sandboxes import disk_pause, memory_templates, network_events
from corral.sandboxes.commands import SandboxCommands
from corral.sandboxes.disk_pause import DiskImage
from corral.sandboxes.files import SandboxFiles
from corral.sandboxes.lifecycle import LiveSandboxes, owner_identity
from corral.sandboxes.live import LiveSandbox, utc
from corral.sandboxes.metrics import MetricRings, check_range, stored_series
from corral.sandboxes.network_events import NetworkEventPump
from corral.sandboxes.observe import observed_create
from corral.sandboxes.options import (
    CreateOptions,
    SandboxRecord,
    check_metadata,
    check_timeout,
    limits_json,
    network_json,
)
from corral.sandboxes.pool import WarmPool
from corral.sandboxes.startup import start_template_command
from corral.sandboxes.volumes import Volumes
from corral.states import LIVE_SANDBOX_STATES, SANDBOX_STATES
from corral.store import MetricPoint, SandboxRow, Store, Team
from corral.store.network_events import NetworkEventRow
from corral.store.pages import check_page_size

log = logging.getLogger("corral.sandboxes")

SHUT_DOWN = "killed: server shut down"


class SandboxManager:
    """Creates, tracks and ends the sandboxes of every team, in this server process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        engine: Engine | None = None,
        pool_size: int = 2,
        tick: float = 0.5,
        metrics_interval: float = 5.0,
    ) -> None:
        self.settings = settings
        self.store = store
        self._own_engine = engine is None
        self.engine = engine or Engine(settings)
        self.tick = tick
        self.metrics_interval = metrics_interval
        # The default tier's pool of `host` (`pool_size`, unless CORRAL_POOLS says).
        self.pool = WarmPool(self.engine, pool_size, "host", settings.default_isolation)
        self._pool_size = pool_size
        # Every warm pool by (tier, engine template): those of `host` made at start, those
        # of the server's base on its first create of a tier when `poolable` says so (the
        # first create is cold: it registers the template with the engine, and a
        # template nobody asks for holds no memory). Sizes: `Settings.pool_plan`.
        self._pools: dict[tuple[str, str], WarmPool] = {}
        self._base_sizes: dict[str, int] = {}  # tier -> its base pool's size
        # Whether an engine template may be pooled: one with no start command (a pooled
        # sandbox never runs one) that is common enough to be worth the memory. Given by
        # the server (the server's `base`, E2B's default); None: only `host` is pooled.
        self.poolable: Callable[[str], bool] | None = None
        self._live = LiveSandboxes(store, metrics_interval)
        self.commands = SandboxCommands(self)
        self.files = SandboxFiles(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._owner = owner_identity()
        self.network_cap = settings.network_cap()
        self.volumes = Volumes(settings, store)
        # `template=NAME` -> the engine's name of the team's template (the template
        # catalog's `resolve(team_id, name)`, given by the server); None: only `host`.
        self.resolve_template: Callable[[str, str], str] | None = None
        # Where a pause to disk keeps a sandbox's filesystem (the template catalog's
        # layer store, given by the server); None: no pause to disk.
        self.layers: LayerStore | None = None
        self._live.pause_to_disk = self._pause_to_disk
        self._live.drop_disk = self._drop_disk
        self.memory_images = memory_templates.MemoryImages(settings.data_dir)

    # -- process lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Clean up after a crashed predecessor, then start the background loops."""
        pools = await self._plan_pools()  # InvalidRequest before anything starts
        self.engine.reap()
        self.engine.start_reaper()
        self._live.fail_orphans(self._owner, adopt=self._adopt)
        self._start_pools(pools)
        self._tasks = [
            asyncio.create_task(_every(self.tick, self._live.enforce_timers), name="timers"),
            asyncio.create_task(
                _every(self.metrics_interval, self._live.sample_metrics), name="metrics"
            ),
        ]

    async def aclose(self) -> None:
        """Flush metrics and kill every live sandbox: none can outlive this process."""
        self._closing = True
        await stop_tasks(*self._tasks)
        self._tasks = []
        # One paused to disk holds nothing here: it stays paused, for the next server.
        live = [entry for entry in self._live if entry.disk is None]
        ends = [self._live.end(entry, "killed", SHUT_DOWN) for entry in live]
        for entry, result in zip(
            live, await asyncio.gather(*ends, return_exceptions=True), strict=True
        ):
            if isinstance(result, Exception):
                log.error(
                    "could not end sandbox at shutdown",
                    extra={"sandbox_id": entry.id, "error": repr(result)},
                )
        pools = {id(p): p for p in (self.pool, *self._pools.values())}.values()
        self._pools = {}
        for pool in pools:
            await pool.aclose()
        if self._own_engine:
            await self.engine.aclose()

    async def _plan_pools(self) -> dict[tuple[str, str], int]:
        """`Settings.pool_plan`: each warm pool's size by (tier, template); a pool whose
        tier the host lacks is left out, with a warning."""
        names = {pool.tier for pool in self.settings.warm_pools(self._pool_size)}
        for name in names:
            with contextlib.suppress(CorralError):  # pool_plan says why, below
                await self.engine.load(name)  # probed off the event loop
        sizes, missing = self.settings.pool_plan(
            lambda name: self.engine.backend(name).name, self._pool_size
        )
        for (tier, template), why in missing.items():
            log.warning("no warm pool of %s on %s: %s", template, tier, why)
        pools = {f"{tier}:{template}": size for (tier, template), size in sizes.items()}
        log.info("warm pools", extra={"pools": pools})
        return sizes

    def _start_pools(self, sizes: dict[tuple[str, str], int]) -> None:
        """Start the pools of `host` that `sizes` gives, and note the base's sizes."""
        default_tier = self._default_tier()
        for (tier, template), size in sizes.items():
            if template != "host":
                self._base_sizes[tier] = size
            elif tier == default_tier:
                self.pool.size = size  # CORRAL_POOLS may say otherwise than pool_size
                self._pools[(tier, template)] = self.pool
            elif size > 0:
                self._pools[(tier, template)] = WarmPool(self.engine, size, template, tier)
        for pool in self._pools.values():
            pool.start()
        if self.pool not in self._pools.values():
            self.pool.start()  # its tier is missing: it says so and stays empty

    def _default_tier(self) -> str | None:
        """The name of this server's default tier, or None where the host lacks it."""
        try:
            return self.engine.backend(self.settings.default_isolation).name
        except CorralError:
            return None

    # -- lifecycle of sandboxes ---------------------------------------------------------

    @tracing.traced("sandbox.create")
    @observed_create
    async def create(self, team: Team, options: CreateOptions) -> SandboxRecord:
        if self._closing:
            raise SandboxNotRunning("the server is shutting down; create the sandbox elsewhere")
        await self.engine.load(options.isolation)  # a tier's first probe off the loop
        limits = options.limits
        limits.check_host()
        self.network_cap.check(options.network, team.name)
        engine_template = self._engine_template(team.id, options.template)
        mounts = self.volumes.mounts(team.id, options.volumes)
        # A tier the host lacks, or a feature the tier lacks, is refused before the row.
        _, tier = self.engine.check(
            engine_template,
            limits,
            options.network,
            options.envs,
            options.isolation,
            volumes=mounts,
            ram_disk=options.ram_disk,
        )
        backend = tier.name
        # Pooled sandboxes have no network, no volumes and a disk: others start cold.
        pool = self._pool_of(engine_template, backend)
        fits = (
            options.network.mode == "none"
            and not mounts
            and not options.ram_disk
            and pool is not None
            and pool.fits(engine_template, backend, limits)
        )
        pooled = pool.claim() if fits and pool is not None else None
        try:
            # Refused for room before its row is written; the engine checks again.
            self.engine.check_room(limits.memory_mib, resizing=pooled)
        except BaseException:
            if pool is not None and pooled is not None:
                pool.give_back(pooled)
            raise
        now = time.time()
        token = "" if options.public_ports else secrets.token_urlsafe(24)
        row = SandboxRow(
            id=pooled.id if pooled else new_sandbox_id(),
            team_id=team.id,
            template=options.template,
            isolation=backend,
            state="creating",
            state_reason="creating",
            metadata=dict(options.metadata),
            limits=limits_json(limits),
            envs=dict(options.envs),
            timeout_seconds=options.timeout_seconds,
            expires_at=utc(now + options.timeout_seconds),
            idle_timeout_seconds=options.idle_timeout_seconds,
            on_idle=options.on_idle,
            created_at=utc(now),
            updated_at=utc(now),
            last_activity_at=utc(now),
            owner_host=self._owner[0],
            owner_pid=self._owner[1],
            owner_start=self._owner[2],
            network=network_json(options.network),
            traffic_token=token,
            public_ports=options.public_ports,
            volumes=[volume.to_json() for volume in options.volumes],
            ram_disk=options.ram_disk,
        )
        logs.bind(sandbox_id=row.id)
        tracing.annotate({tracing.SANDBOX_ID: row.id, "corral.sandbox.tier": backend})
        try:
            self.store.insert_sandbox(row)  # within the team's quotas, or QuotaExceeded
        except BaseException:
            if pool is not None and pooled is not None:
                pool.give_back(pooled)
            raise
        entry = LiveSandbox(
            id=row.id,
            team_id=team.id,
            envs=dict(options.envs),
            rings=MetricRings(self.metrics_interval),
            expires_at=now + options.timeout_seconds,
            idle_timeout=options.idle_timeout_seconds,
            on_idle=options.on_idle,
            on_timeout=options.on_timeout,
            pause_keeps_memory=options.pause_keeps_memory,
            last_activity=now,
            saved_activity=now,
            traffic_token=token,
            public_ports=options.public_ports,
        )
        self._live.add(entry)
        async with entry.lock:
            try:
                sandbox, how = await self._start(
                    row.id, team.id, options, engine_template, pooled, mounts
                )
            except BaseException as exc:
                entry.state = "failed"
                self._live.discard(row.id)
                if isinstance(exc, CapacityExceeded):
                    # Another process took the room since `check_room`: refused like a
                    # quota, so nothing is left of it (no row for the team to list).
                    self.store.delete_creating_sandbox(row.id)
                    raise
                reason = f"failed: {exc}" if isinstance(exc, CorralError) else "failed: cancelled"
                self.store.transition(row.id, "failed", reason, from_states=("creating",))
                raise
            tracing.annotate({"corral.sandbox.start": how})
            entry.sandbox, entry.state = sandbox, "running"
            entry.network = NetworkEventPump(self.store, sandbox)
            self._live.baseline(entry)
            reason = _CREATED[how]
            created = self.store.transition(row.id, "running", reason, from_states=("creating",))
        assert created is not None  # only this call changes a creating row of this process
        log.info(
            "sandbox created",
            extra={"sandbox_id": row.id, "team_id": team.id, "how": how},
        )
        return self._record(created)

    def _pool_of(self, engine_template: str, tier: str) -> WarmPool | None:
        """The warm pool for sandboxes of `engine_template` on `tier` (started now if the
        template is poolable, the plan gives its tier a base pool, and it has none yet);
        None: they start cold."""
        key = (tier, engine_template)
        pool = self._pools.get(key)
        size = self._base_sizes.get(tier, 0)
        if (
            pool is None
            and size > 0
            and engine_template != "host"
            and not self._closing
            and self.poolable is not None
            and self.poolable(engine_template)
        ):
            pool = self._pools[key] = WarmPool(self.engine, size, engine_template, tier)
            pool.start()
        return pool

    @property
    def pools(self) -> list[WarmPool]:
        """Every warm pool of this manager (for metrics and tests)."""
        return list(self._pools.values())

    def _engine_template(self, team_id: str, name: str) -> str:
        """The engine's name of the team's template `name` (a team's templates are its
        own: another team's is not found)."""
        if self.resolve_template is None:
            get_template(name)
            return name
        return self.resolve_template(team_id, name)

    async def _start(
        self,
        sandbox_id: str,
        team_id: str,
        options: CreateOptions,
        template: str,
        pooled: Sandbox | None,
        mounts: tuple[VolumeMount, ...],
    ) -> tuple[Sandbox, str]:
        """The engine sandbox for a new row: the pooled one with the asked limits, one
        restored from its template's memory image, or a cold one; and which (a key of
        `_CREATED`)."""
        if pooled is not None:
            try:
                await self.engine.set_limits(pooled, options.limits)
                return pooled, "warm"
            except CapacityExceeded:
                await pooled.destroy()  # a cold one would not fit either
                raise
            except BaseException as exc:
                # E.g. a memory limit under what the sandbox uses already: start afresh.
                log.warning("pooled sandbox refused its limits: %s", exc)
                await pooled.destroy()
                if not isinstance(exc, CorralError):
                    raise
        if not mounts and not options.envs:
            restored = await self._restore_started(sandbox_id, team_id, template, options)
            if restored is not None:
                return restored
        cold = await self._boot(sandbox_id, template, options, mounts)
        return cold, "cold"

    async def _restore_started(
        self, sandbox_id: str, team_id: str, template: str, options: CreateOptions
    ) -> tuple[Sandbox, str] | None:
        """A sandbox of `template` restored from its memory image (made now if it has
        none for these options: `corral.sandboxes.memory_templates`), its start command
        already run; None where a restore cannot give what `options` ask (the caller
        leaves out creates with environment variables or volumes) or the image could not
        be made or restored: the caller starts it cold."""
        spec, backend = self.engine.check(
            template, options.limits, options.network, {}, options.isolation,
            ram_disk=options.ram_disk,
        )  # fmt: skip
        if spec.rootfs is None or not spec.rootfs.start or not backend.memory_snapshots:
            return None
        try:
            backend.check_checkpoint(spec, "keep a memory image of the template")
        except IsolationUnavailable:
            return None  # e.g. a network the tier cannot checkpoint
        mode = options.network.mode
        key = memory_templates.image_key(backend.name, options.limits, mode, options.ram_disk)
        what = memory_templates.MemoryImage(
            tier=backend.name,
            memory_mib=options.limits.memory_mib,
            cpu=options.limits.cpu,
            network=mode,
            ram_disk=options.ram_disk,
            limits=limits_json(options.limits),
            created_at=time.time(),
        )

        async def make(image: Path) -> None:
            # A neutral sandbox (an id of its own, the template's environment alone).
            maker = await self.engine.create(
                template=template,
                limits=options.limits,
                network=options.network,
                isolation=backend.name,
                ram_disk=options.ram_disk,
            )
            try:
                await start_template_command(maker, {})
                await maker.checkpoint(image)  # destroys it
            finally:
                if maker.state is not SandboxState.DESTROYED:
                    await maker.destroy()

        # A cold start would not fit either, or its start command would fail the same.
        retry = (CapacityExceeded, SandboxStartFailed)
        found = await self.memory_images.image(team_id, template, key, what, make, retry)
        if found is None:
            return None
        image, made = found
        try:
            sandbox = await self.engine.create(
                template=template,
                limits=options.limits,
                network=options.network,
                isolation=backend.name,
                sandbox_id=sandbox_id,
                ram_disk=options.ram_disk,
                restore=image,
            )
        except CapacityExceeded:
            raise
        except CorralError as exc:
            log.warning("the template's memory image did not restore; starting cold: %s", exc)
            return None
        return sandbox, "made" if made else "restored"

    async def _boot(
        self,
        sandbox_id: str,
        template: str,
        options: CreateOptions,
        mounts: tuple[VolumeMount, ...],
    ) -> Sandbox:
        """A cold engine sandbox of `template` as `options` ask, its start command run."""
        cold = await self.engine.create(
            template=template,
            limits=options.limits,
            network=options.network,
            env=options.envs,
            isolation=options.isolation,
            sandbox_id=sandbox_id,
            volumes=mounts,
            ram_disk=options.ram_disk,
        )
        try:
            await start_template_command(cold, options.envs)
        except BaseException:
            await cold.destroy()
            raise
        return cold

    @tracing.traced("sandbox.snapshot")
    async def snapshot(
        self, team_id: str, sandbox_id: str, store: LayerStore, max_bytes: int | None
    ) -> tuple[tuple[str, ...], Sandbox]:
        """The layers of the team's running or paused sandbox's `/` as it is now (its
        template's and one of its changes, `Sandbox.snapshot`), and the sandbox."""
        entry = self._live.get(sandbox_id) if isinstance(sandbox_id, str) else None
        if entry is None or entry.team_id != team_id:
            raise NotFound(_not_found(sandbox_id) + " (a snapshot needs a live sandbox of yours)")
        async with entry.lock:
            if entry.sandbox is None or entry.state not in ("running", "paused"):
                raise SandboxNotRunning(f"sandbox {sandbox_id} is {entry.state}")
            return await entry.sandbox.snapshot(store, max_bytes=max_bytes), entry.sandbox

    async def get(self, team: Team, sandbox_id: str) -> SandboxRecord:
        return self._record(self._owned(team, sandbox_id))

    @tracing.traced("sandbox.kill")
    async def kill(self, team: Team, sandbox_id: str) -> None:
        entry = self._entry(team, sandbox_id)
        await self._live.locked(entry, ("running", "paused"), "kill")
        await self._live.end(entry, "killed", "killed: by request")

    @tracing.traced("sandbox.pause")
    async def pause(
        self, team: Team, sandbox_id: str, *, keep_memory: bool = True
    ) -> SandboxRecord:
        """Freeze the sandbox's processes (`keep_memory`), or pause it to disk: keep its
        filesystem only, its processes ended and its memory released (`disk_pause`)."""
        entry = self._entry(team, sandbox_id)
        live = self._live
        if keep_memory:
            row = await live.locked(entry, ("running",), "pause", live.pause, "paused: by request")
        else:
            row = await live.locked(
                entry, ("running",), "pause", self._pause_to_disk, "paused to disk: by request"
            )
        assert row is not None
        return self._record(row)

    @tracing.traced("sandbox.resume")
    async def resume(self, team: Team, sandbox_id: str) -> SandboxRecord:
        """Thaw a frozen sandbox, or boot one paused to disk from its filesystem."""
        entry = self._entry(team, sandbox_id)
        row = await self._live.locked(entry, ("paused",), "resume", self._resume, "resumed")
        assert row is not None
        return self._record(row)

    async def _pause_to_disk(self, entry: LiveSandbox, reason: str) -> SandboxRow | None:
        sandbox = entry.sandbox
        assert sandbox is not None
        memory = self._keeps_memory(sandbox)
        if self.layers is None and not memory:
            raise SnapshotUnavailable(
                "this server process keeps no template layers, so it cannot pause to disk; "
                "pause with the memory kept (keep_memory=true)"
            )
        self._live.flush(entry, final=False)
        if memory:
            try:
                disk = await disk_pause.checkpoint(
                    sandbox,
                    self.settings.data_dir,
                    on_timeout=entry.on_timeout,
                    pause_keeps_memory=entry.pause_keeps_memory,
                )
            except BaseException as exc:
                if sandbox.state is SandboxState.DESTROYED:  # lost in the attempt
                    why = str(exc) if isinstance(exc, CorralError) else "cancelled"
                    await self._live.end_locked(
                        entry, "failed", f"failed: could not pause it to disk: {why}"
                    )
                raise
        else:
            assert self.layers is not None
            disk = await disk_pause.save(
                sandbox,
                self.layers,
                self.settings.data_dir,
                self.settings.template_max_bytes,
                on_timeout=entry.on_timeout,
                pause_keeps_memory=entry.pause_keeps_memory,
            )
        # From here on the sandbox is the image: the engine sandbox goes.
        entry.disk, entry.sandbox, entry.state = disk, None, "paused"
        if entry.network is not None:
            await entry.network.stop()
            entry.network = None
        try:
            await sandbox.destroy()
        except Exception:
            log.exception(
                "could not destroy a paused-to-disk sandbox", extra={"sandbox_id": entry.id}
            )
        return self._live.record_paused(entry, reason)

    def _keeps_memory(self, sandbox: Sandbox) -> bool:
        """Whether a pause to disk of `sandbox` keeps its memory (a checkpoint). Where
        its tier cannot checkpoint it, one of a layer template keeps its files alone,
        as on a tier without memory snapshots; any other is refused by its checkpoint,
        which says why."""
        backend = self.engine.backend(sandbox.backend)
        if not backend.memory_snapshots:
            return False
        if sandbox.spec.rootfs is not None:
            try:
                backend.check_checkpoint(sandbox.spec, "pause it to disk with its memory")
            except IsolationUnavailable:
                return False
        return True

    async def _resume(self, entry: LiveSandbox, reason: str) -> SandboxRow | None:
        disk = entry.disk
        if disk is None:
            return await self._live.resume(entry, reason)
        if self.layers is None and not disk.memory:
            raise SnapshotUnavailable(
                f"sandbox {entry.id} is paused to disk and this server process keeps no "
                "template layers to boot it from; resume it through the server"
            )
        # Started as it was created, with what its row says now (its network may have
        # changed while it was paused); its filesystem (and memory) the image's.
        row = self.store.sandbox(entry.id)
        assert row is not None  # a live sandbox's row stays until it ends
        record = self._record(row)
        options = CreateOptions(
            template=record.template,
            isolation=record.isolation,
            limits=record.limits,
            envs=dict(entry.envs),
            network=record.network,
            volumes=record.volumes,
            ram_disk=record.ram_disk,
        )
        mounts = self.volumes.mounts(entry.team_id, options.volumes)
        if disk.memory:
            sandbox = await self.engine.create(
                template=self._engine_template(entry.team_id, options.template),
                limits=options.limits,
                network=options.network,
                env=options.envs,
                isolation=options.isolation,
                sandbox_id=entry.id,
                volumes=mounts,
                ram_disk=options.ram_disk,
                restore=disk.checkpoint_dir(self.settings.data_dir),
            )
            how = "restored with its memory: its processes go on"
        else:

            async def start(template: str) -> Sandbox:
                return await self._boot(entry.id, template, options, mounts)

            assert self.layers is not None
            sandbox = await disk.boot(self.engine.templates, self.layers, start)
            how = "booted from its filesystem: its processes were not kept"
        self._drop_disk(disk)  # the new sandbox holds what it started from
        entry.disk, entry.sandbox = None, sandbox
        entry.network = NetworkEventPump(self.store, sandbox)
        entry.state = "running"
        entry.touch(time.time())
        self._live.baseline(entry)
        return self.store.transition(
            entry.id,
            "running",
            f"{reason} ({how})",
            from_states=("paused",),
            last_activity_at=utc(entry.last_activity),
        )

    def _drop_disk(self, disk: DiskImage) -> None:
        disk.drop(self.layers, self.settings.data_dir)

    def _adopt(self, row: SandboxRow) -> bool:
        """Take on a sandbox a server that stopped left paused to disk (its image is
        still here): it stays paused, now this process's. False: not one of those."""
        if row.state != "paused":
            return False
        disk = DiskImage.read(self.settings.data_dir, row.id)
        if disk is None:
            return False
        host, pid, start = self._owner
        self.store.update_sandbox(row.id, owner_host=host, owner_pid=pid, owner_start=start)
        self._live.add(
            LiveSandbox(
                id=row.id,
                team_id=row.team_id,
                envs=dict(row.envs),
                rings=MetricRings(self.metrics_interval),
                expires_at=row.expires_at.timestamp(),
                idle_timeout=row.idle_timeout_seconds,
                on_idle="kill" if row.on_idle == "kill" else "pause",
                on_timeout="pause" if disk.on_timeout == "pause" else "kill",
                pause_keeps_memory=disk.pause_keeps_memory,
                last_activity=row.last_activity_at.timestamp(),
                saved_activity=row.last_activity_at.timestamp(),
                traffic_token=row.traffic_token,
                public_ports=row.public_ports,
                state="paused",
                disk=disk,
            )
        )
        log.info("sandbox paused to disk adopted", extra={"sandbox_id": row.id})
        return True

    async def set_timeout(
        self, team: Team, sandbox_id: str, seconds: int, *, zero_ok: bool = False
    ) -> SandboxRecord:
        """Kill the sandbox `seconds` from now instead of at its current deadline (with
        `zero_ok`, 0 is now: E2B's set_timeout(0) ends it at the next tick)."""
        check_timeout(seconds, zero_ok=zero_ok)
        entry = self._entry(team, sandbox_id)
        expires = time.time() + seconds
        self.store.update_sandbox(sandbox_id, expires_at=utc(expires), timeout_seconds=seconds)
        entry.expires_at = expires
        return await self.get(team, sandbox_id)

    @tracing.traced("sandbox.update_network")
    async def update_network(
        self, team: Team, sandbox_id: str, policy: NetworkPolicy
    ) -> SandboxRecord:
        """Change what a running (or paused) sandbox may reach: the tier applies the new
        policy (or refuses it, changing nothing), then the row records it."""
        self.network_cap.check(policy, team.name)
        entry = self._entry(team, sandbox_id)

        async def change(entry: LiveSandbox, reason: str) -> None:
            if entry.sandbox is not None:  # paused to disk: its resume reads the row
                await entry.sandbox.set_network(policy)
            elif entry.disk is not None and entry.disk.memory:
                _check_restored_network(entry.id, self._owned(team, sandbox_id), policy)
            self.store.update_sandbox(sandbox_id, network=network_json(policy))

        await self._live.locked(entry, ("running", "paused"), "change the network of", change)
        log.info(
            "sandbox network changed", extra={"sandbox_id": sandbox_id, "network": str(policy)}
        )
        return await self.get(team, sandbox_id)

    async def ping(self, team: Team, sandbox_id: str) -> None:
        """Reset the inactivity timer."""
        self._entry(team, sandbox_id).touch(time.time())

    # -- serving commands and files ----------------------------------------------------

    async def running(self, team: Team, sandbox_id: str) -> Sandbox:
        """The live engine sandbox, for `commands` and `files` (and in-process callers
        that run it directly); counts as activity. The API server never takes it."""
        entry = self._live.get(sandbox_id)
        if entry is not None and entry.team_id == team.id and entry.state == "creating":
            async with entry.lock:  # wait for the creation to end
                pass
        entry = self._entry(team, sandbox_id)
        if entry.state == "paused":
            raise SandboxNotRunning(f"sandbox {sandbox_id} is paused; resume it first")
        if entry.state != "running" or entry.sandbox is None:
            raise SandboxNotRunning(f"sandbox {sandbox_id} is {entry.state}")
        entry.touch(time.time())
        return entry.sandbox

    def touch(self, sandbox_id: str) -> None:
        """Record activity (an exec chunk); O(1), saved to the store in batches."""
        entry = self._live.get(sandbox_id)
        if entry is not None:
            entry.touch(time.time())

    def live_state(self, sandbox_id: str) -> str | None:
        """The state of a sandbox this server runs (None: it runs none of that id). It
        leaves "running" as soon as an end begins, before the store records the end."""
        entry = self._live.get(sandbox_id)
        return None if entry is None else entry.state

    def envs(self, sandbox_id: str) -> dict[str, str]:
        """The sandbox's environment, to merge under each command's own."""
        entry = self._live.get(sandbox_id)
        if entry is None:
            raise NotFound(_not_found(sandbox_id))
        return dict(entry.envs)

    async def metrics(
        self, team: Team, sandbox_id: str, range: Literal["10m", "2h", "24h"]
    ) -> list[MetricPoint]:
        check_range(range)
        self._owned(team, sandbox_id)
        entry = self._live.get(sandbox_id)
        if entry is not None:
            return entry.rings.series(range)
        return stored_series(self.store, sandbox_id, range)

    def network_events(
        self,
        team: Team,
        sandbox_id: str,
        *,
        offset: int = 0,
        follow: bool = False,
        stop: asyncio.Event | None = None,
    ) -> AsyncIterator[tuple[list[NetworkEventRow], int]]:
        """Pages of the sandbox's network events from seq `offset`, each with the count
        of its events the cap deleted; with `follow`, until the sandbox ends."""
        self._owned(team, sandbox_id)
        return network_events.follow(
            self.store, sandbox_id, offset=offset, follow=follow, stop=stop
        )

    # -- exposed ports ------------------------------------------------------------------

    def exposed(self, sandbox_id: str, token: str | None) -> Sandbox:
        """A running sandbox of this process whose ports `token` may reach, for the port
        proxy (`Sandbox.open_port`); counts as activity.

        No team here: the sandbox's traffic access token is the credential (none for
        public ports), checked before anything else about the sandbox is told. A wrong
        token is refused, never answered by another sandbox.
        """
        entry = self._live.get(sandbox_id)
        if entry is None:
            raise NotFound(
                f"no sandbox {sandbox_id!r} is running on this server; check the id in the "
                "URL (`corral sandbox list`)"
            )
        if not entry.public_ports:
            if not token:
                raise Unauthenticated(
                    f"sandbox {sandbox_id}'s ports need its traffic access token: send the "
                    "header `X-Corral-Traffic-Token` (or `e2b-traffic-access-token`), or add "
                    "`?corral_token=<token>`; `corral sandbox url` prints a URL with it"
                )
            if not entry.traffic_token or not hmac.compare_digest(
                token.encode(), entry.traffic_token.encode()
            ):
                raise Forbidden(
                    f"wrong traffic access token for sandbox {sandbox_id}: use the "
                    "`traffic_token` that creating or getting that sandbox returned"
                )
        if entry.state == "paused":
            raise SandboxNotRunning(f"sandbox {sandbox_id} is paused; resume it first")
        if entry.state != "running" or entry.sandbox is None:
            raise SandboxNotRunning(f"sandbox {sandbox_id} is {entry.state}")
        entry.touch(time.time())
        return entry.sandbox

    # -- lookups ------------------------------------------------------------------------

    def _owned(self, team: Team, sandbox_id: str) -> SandboxRow:
        row = self.store.sandbox(sandbox_id) if isinstance(sandbox_id, str) else None
        if row is None or row.team_id != team.id:
            raise NotFound(_not_found(sandbox_id))
        logs.bind(sandbox_id=row.id)
        return row

    def _entry(self, team: Team, sandbox_id: str) -> LiveSandbox:
        """The team's live sandbox, or the error that says why there is none."""
        logs.bind(sandbox_id=sandbox_id)
        tracing.annotate({tracing.SANDBOX_ID: sandbox_id})  # the span of the operation on it
        entry = self._live.get(sandbox_id)
        if entry is not None and entry.team_id == team.id:
            return entry
        row = self._owned(team, sandbox_id)
        if row.state in LIVE_SANDBOX_STATES:
            raise SandboxNotRunning(
                f"sandbox {sandbox_id} is run by another server process "
                f"(pid {row.owner_pid} on {row.owner_host})"
            )
        raise SandboxNotRunning(f"sandbox {sandbox_id} is {row.state} ({row.state_reason})")

    def _record(self, row: SandboxRow) -> SandboxRecord:
        entry = self._live.get(row.id)
        return SandboxRecord.from_row(
            row, utc(entry.last_activity) if entry else None, self.settings.ports_domain
        )

    # Defined last: inside the class body the name `list` is this method from here on.
    async def list(
        self,
        team: Team,
        *,
        states: Sequence[str] = (),
        metadata: Mapping[str, str] | None = None,
        page_size: int = 100,
        page_token: str = "",
        newest_first: bool = False,
        created_after: datetime | None = None,
        template: str | None = None,
    ) -> tuple[list[SandboxRecord], str]:
        """A page of the team's sandboxes, oldest first (or newest first), and the next
        page's token ("": last); `created_after` is inclusive."""
        unknown = [s for s in states if s not in SANDBOX_STATES]
        if unknown:
            raise InvalidRequest(
                f"unknown states {unknown}; use some of {', '.join(SANDBOX_STATES)}"
            )
        rows, token = self.store.list_sandboxes(
            team.id,
            states=list(states or LIVE_SANDBOX_STATES),
            metadata=check_metadata(metadata or {}),
            page_size=check_page_size(page_size),
            page_token=page_token,
            newest_first=newest_first,
            created_after=created_after,
            template=template,
        )
        return [self._record(row) for row in rows], token


_CREATED = {
    "cold": "created",
    "warm": "created from the warm pool",
    "restored": "created from the template's memory image (its start command had run)",
    "made": (
        "created from the template's memory image, made now (its start command had run): "
        "later creates restore it"
    ),
}


def _check_restored_network(sandbox_id: str, row: SandboxRow, policy: NetworkPolicy) -> None:
    """Refuse what a sandbox paused with its memory would refuse running: an uplink for
    one made without (its restored processes live in a sandbox that has none)."""
    if row.network.get("mode", "none") == "none" and policy.mode != "none":
        raise IsolationUnavailable(
            f"sandbox {sandbox_id} was created with network 'none' and has no uplink; "
            "create a new sandbox with network 'internet' or 'allowlist' to change "
            "its network later"
        )


def _not_found(sandbox_id: str) -> str:
    return f"no sandbox {sandbox_id!r}; check the id with `corral sandbox list`"


async def _every(interval: float, work: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await work()
        except Exception:
            log.exception("background loop failed; it goes on")
