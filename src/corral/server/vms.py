"""The VmService RPCs: a team's vms (`corral.vms`), each a sandbox of its language
template started and stopped on request.

A vm composes what exists: its template is the team's `lang-<language>`, a `debian`
build through the TemplateCatalog (so a second vm of a language reuses it, and its
build's progress is the template's log stream); its /persist is the team's volume
`vm-<name>`; its sandbox is an ordinary one of the team (commands and files go through
SandboxService on `sandbox_id`).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from connectrpc.request import RequestContext

from corral.errors import (
    FileError,
    NotFound,
    ServerUnavailable,
    TemplateNotFound,
    UnknownVolume,
    VmNotReady,
    VolumeExists,
)
from corral.images import Base, BuildPlan
from corral.sandboxes.options import MAX_TIMEOUT_SECONDS, CreateOptions
from corral.server import convert
from corral.server.base import Handlers, Services
from corral.store.vms import VmRow
from corral.v1 import vms_pb2 as pb
from corral.vms import (
    IN_DIR,
    OUT_DIR,
    PERSIST_PATH,
    VmSpec,
    check_vm_name,
    template_name,
    volume_name,
)
from corral.volumes import VolumeSpec

if TYPE_CHECKING:
    from corral.store import Team
    from corral.templates import TemplateCatalog

Ctx = RequestContext[Any, Any]

# The sandbox states in which a vm counts as running.
_LIVE = ("running", "paused")


def _spec(row: VmRow) -> VmSpec:
    return VmSpec(
        name=row.name,
        language=row.language,
        cpu=row.cpu,
        memory_mib=row.memory_mib,
        network=row.network,
        persist=row.persist,
        isolation=row.isolation,
    )


class VmHandlers(Handlers):
    """Every RPC of `corral.v1.VmService`. Start and Stop of one vm take turns (a lock
    per vm in this process), so two Starts never make two sandboxes."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, team: Team, name: str) -> asyncio.Lock:
        return self._locks.setdefault((team.id, name), asyncio.Lock())

    @property
    def _catalog(self) -> TemplateCatalog:
        if self._services.templates is None:
            raise ServerUnavailable("the Corral server is starting or stopping; try again")
        return self._services.templates

    async def create(self, request: pb.CreateVmRequest, ctx: Ctx) -> pb.CreateVmResponse:
        team = self._team(ctx)
        spec = VmSpec(
            name=request.name,
            language=request.language,
            cpu=request.cpu or 1.0,
            memory_mib=request.memory_mib or 512,
            network=request.network or "none",
            persist=request.persist,
            persist_mib=request.persist_mib or 1024,
            isolation=request.isolation or "auto",
        )
        spec.limits().check_host()
        manager = self._manager
        manager.network_cap.check(spec.network_policy(), team.name)
        # A tier the host lacks, or one that cannot give the vm's network or /persist, is
        # refused as its sandboxes would be, before anything is made.
        await manager.engine.load(spec.isolation)  # a tier's first probe off the loop
        manager.engine.check_tier(
            spec.isolation, spec.template, spec.network_policy(), volumes=spec.persist
        )
        store = manager.store
        store.insert_vm(self._row(team, spec))  # VmExists for a name the team has
        made_volume = False
        try:
            # The volume first: refused (its quota), no template build has started.
            if spec.volume is not None:
                try:
                    await asyncio.to_thread(
                        manager.volumes.create, team, spec.volume, spec.persist_mib
                    )
                    made_volume = True
                except VolumeExists:
                    pass  # kept by `vm clean --keep-persist`: the new vm has its data back
            await self._ensure_template(team, spec)
        except BaseException:
            # Refused: nothing is left of it.
            if made_volume and spec.volume is not None:
                await asyncio.to_thread(manager.volumes.delete, team, spec.volume)
            store.delete_vm(team.id, spec.name)
            raise
        return pb.CreateVmResponse(vm=await self._message(team, store.vm(team.id, spec.name)))

    def _row(self, team: Team, spec: VmSpec) -> VmRow:
        return VmRow(
            team_id=team.id,
            name=spec.name,
            language=spec.language,
            cpu=float(spec.cpu),
            memory_mib=spec.memory_mib,
            network=spec.network,
            persist=spec.persist,
            created_at=datetime.now(UTC),
            isolation=spec.isolation,
        )

    async def _ensure_template(self, team: Team, spec: VmSpec) -> None:
        """Start the build of the team's language template unless it has one that is
        ready or building (a failed or cancelled one is built again)."""
        from corral.images.debian import host_suite
        from corral.templates import BuildRequest

        catalog = self._catalog
        try:
            record = await catalog.get(team.id, spec.template)
        except TemplateNotFound:
            record = None
        if record is not None and record.state in ("ready", "building"):
            return
        try:  # an older ready build still serves while a newer one failed
            catalog.serving(team.id, spec.template)
            return
        except TemplateNotFound:
            pass
        base = Base("debian", host_suite(), variant="apt", packages=spec.base.packages)
        plan = BuildPlan(base, ())
        await catalog.build(
            team.id,
            BuildRequest(name=spec.template, plan=plan, source="debian"),
        )

    async def get(self, request: pb.GetVmRequest, ctx: Ctx) -> pb.GetVmResponse:
        team = self._team(ctx)
        row = self._manager.store.vm(team.id, check_vm_name(request.name))
        return pb.GetVmResponse(vm=await self._message(team, row))

    async def list(self, request: pb.ListVmsRequest, ctx: Ctx) -> pb.ListVmsResponse:
        team = self._team(ctx)
        messages = [await self._message(team, row) for row in self._manager.store.vms(team.id)]
        if not request.all:
            messages = [m for m in messages if m.state == "running"]
        return pb.ListVmsResponse(vms=messages)

    async def start(self, request: pb.StartVmRequest, ctx: Ctx) -> pb.StartVmResponse:
        team = self._team(ctx)
        name = check_vm_name(request.name)
        manager = self._manager
        async with self._lock(team, name):
            row = manager.store.vm(team.id, name)
            if self._live_sandbox(team, row) is None:
                row = await self._start(team, row)
            return pb.StartVmResponse(vm=await self._message(team, row))

    async def _start(self, team: Team, row: VmRow) -> VmRow:
        spec = _spec(row)
        catalog, manager = self._catalog, self._manager
        try:
            catalog.serving(team.id, spec.template)
        except TemplateNotFound as exc:
            await self._ensure_template(team, spec)  # deleted since: built again
            raise VmNotReady(
                f"vm {row.name!r} cannot start yet: {exc} (`corral template logs "
                f"{spec.template} --follow` shows its build)"
            ) from None
        options = CreateOptions(
            template=spec.template,
            limits=spec.limits(),
            network=spec.network_policy(),
            # A vm runs until stopped; a sandbox lives at most this long, after which
            # the vm is stopped and its next Start makes a new one.
            timeout_seconds=MAX_TIMEOUT_SECONDS,
            isolation=spec.isolation,
            metadata={"corral.vm": row.name},
            volumes=(VolumeSpec(volume_name(row.name), PERSIST_PATH),) if row.persist else (),
        )
        record = await manager.create(team, options)
        try:
            for place in (IN_DIR, OUT_DIR):
                try:
                    await manager.files.make_dir(team, record.id, place)
                except FileError as exc:
                    raise VmNotReady(
                        f"vm {row.name!r}: its template cannot make {place}: {exc}"
                    ) from exc
        except BaseException:
            await manager.kill(team, record.id)
            raise
        manager.store.set_vm_sandbox(team.id, row.name, record.id)
        return manager.store.vm(team.id, row.name)

    def _live_sandbox(self, team: Team, row: VmRow) -> str | None:
        """The vm's sandbox if it is running or paused."""
        if row.sandbox_id is None:
            return None
        sandbox = self._manager.store.sandbox(row.sandbox_id)
        if sandbox is None or sandbox.team_id != team.id or sandbox.state not in _LIVE:
            return None
        return row.sandbox_id

    async def stop(self, request: pb.StopVmRequest, ctx: Ctx) -> pb.StopVmResponse:
        team = self._team(ctx)
        name = check_vm_name(request.name)
        async with self._lock(team, name):
            row = await self._stop(team, self._manager.store.vm(team.id, name))
            return pb.StopVmResponse(vm=await self._message(team, row))

    async def _stop(self, team: Team, row: VmRow) -> VmRow:
        manager = self._manager
        sandbox_id = self._live_sandbox(team, row)
        if sandbox_id is not None:
            with contextlib.suppress(NotFound):  # it ended meanwhile
                await manager.kill(team, sandbox_id)
        manager.store.set_vm_sandbox(team.id, row.name, None)
        return manager.store.vm(team.id, row.name)

    async def delete(self, request: pb.DeleteVmRequest, ctx: Ctx) -> pb.DeleteVmResponse:
        team = self._team(ctx)
        name = check_vm_name(request.name)
        manager = self._manager
        async with self._lock(team, name):
            row = await self._stop(team, manager.store.vm(team.id, name))
            if row.persist and not request.keep_persist:
                with contextlib.suppress(UnknownVolume):  # deleted by hand already
                    await asyncio.to_thread(manager.volumes.delete, team, volume_name(name))
            manager.store.delete_vm(team.id, name)
        return pb.DeleteVmResponse()

    async def _message(self, team: Team, row: VmRow) -> pb.Vm:
        template = template_name(row.language)
        message = pb.Vm(
            name=row.name,
            language=row.language,
            cpu=row.cpu,
            memory_mib=row.memory_mib,
            network=row.network,
            persist=row.persist,
            created_at=convert.timestamp(row.created_at),
            template=template,
            volume=volume_name(row.name) if row.persist else "",
            isolation=row.isolation,
        )
        sandbox_id = self._live_sandbox(team, row)
        if sandbox_id is not None:
            message.state, message.sandbox_id = "running", sandbox_id
            return message
        try:
            self._catalog.serving(team.id, template)
            message.state = "stopped"
        except TemplateNotFound:
            try:
                record = await self._catalog.get(team.id, template)
            except TemplateNotFound:
                message.state = "stopped"  # deleted: its next Start builds it again
                return message
            message.state = "building" if record.state == "building" else "failed"
            if record.state != "building":
                message.error = record.error or f"its template {template} {record.state}"
        return message
