"""The template catalog: a team's templates by name, backed by the SQL store, served by
the engine.

The store is the truth (`corral.store.templates`: one row per build); the engine's
`Templates` registry is a cache of it, named by row id, so that two teams' templates of
the same name never meet and a rebuild's new row replaces the old one atomically. A
process registers every ready template when it starts (`load`) and any one another
process made on first use (`resolve`), each holding references on its layers.

Builds are jobs on the existing queue (`BuildQueue`, given by the jobs runtime): `build`
records a `building` row and submits the job; the job runs `corral.templates.builder`
and ends the row through `finish_build`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import secrets
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, cast

from corral.config import Settings
from corral.errors import (
    Forbidden,
    InvalidRequest,
    TemplateInUse,
    TemplateNotFound,
    UnknownLayer,
)
from corral.images import Base, BuildPlan, LayerStore
from corral.images import flatten as flatten_layers
from corral.images.oci import LOCAL_TRANSPORTS
from corral.isolation import Engine
from corral.isolation.templates import TEMPLATE_NAMES
from corral.network.policy import NetworkPolicy
from corral.sandboxes import SandboxManager, memory_templates
from corral.sandboxes.memory_templates import MemoryImage
from corral.store import Store
from corral.store.templates import TemplateRow
from corral.templates import base as server_base
from corral.templates._plan import plan_to_dict
from corral.templates.defaults import SandboxDefaults

log = logging.getLogger("corral.templates")

SOURCES = ("dockerfile", "recipe", "e2b", "image", "debian", "snapshot")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_READY_TIMEOUT = 3600.0


def new_template_id() -> str:
    return "t" + secrets.token_hex(10)


@dataclass(frozen=True)
class TemplateRecord:
    """A team's template as the service shows it (the newest build of its name).

    `team` is the team's id. `steps_total` counts the plan's steps; `steps_cached` those
    whose layer came from the build cache. `error` (failed) names the step and holds the
    tail of its log. Times are Unix seconds."""

    team: str
    name: str
    state: str  # "building" | "ready" | "failed" | "cancelled"
    source: str  # "dockerfile" | "recipe" | "e2b" | "image" | "debian" | "snapshot"
    layers: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str | None
    user: str
    start_cmd: str | None
    ready_cmd: str | None
    size_bytes: int
    build_job_id: str | None
    steps_total: int
    steps_cached: int
    error: str | None
    created_at: float
    updated_at: float
    # What its sandboxes and jobs get for the limits and network their request leaves unset.
    defaults: SandboxDefaults = field(default_factory=SandboxDefaults)
    # Its version's memory images, one per tier and options its creates asked for
    # (`corral.sandboxes.memory_templates`): those creates restore its started sandbox.
    memory_images: tuple[MemoryImage, ...] = ()

    @classmethod
    def from_row(cls, row: TemplateRow) -> TemplateRecord:
        return cls(
            team=row.team_id,
            name=row.name,
            state=row.state,
            source=row.source,
            layers=tuple(row.layers),
            env=dict(row.env),
            workdir=row.workdir,
            user=row.user,
            start_cmd=row.start_cmd,
            ready_cmd=row.ready_cmd,
            size_bytes=row.size_bytes,
            build_job_id=row.build_job_id,
            steps_total=row.steps_total,
            steps_cached=row.steps_cached,
            error=row.error,
            created_at=row.created_at.timestamp(),
            updated_at=row.updated_at.timestamp(),
            defaults=row_defaults(row),
        )


@dataclass(frozen=True)
class BuildRequest:
    """What to build: `plan` is parsed by the caller (the server, with corral.images'
    parsers); `context` is a tar of the files COPY and ADD take; `network` is the policy
    of RUN steps; `defaults` are the template's sandboxes'."""

    name: str
    plan: BuildPlan
    source: str
    context: bytes | None = None
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    ready_timeout_s: float = 60
    defaults: SandboxDefaults = field(default_factory=SandboxDefaults)


class BuildQueue(Protocol):
    """Where build jobs go (the job queue, which is above this package)."""

    async def submit_build(self, team_id: str, template_id: str, name: str) -> str:
        """Queue the build of the template row `template_id`; the job's id."""
        ...

    def cancel_build(self, job_id: str, reason: str) -> None: ...


def check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name in TEMPLATE_NAMES:
        raise InvalidRequest(
            f"template name {name!r} is invalid or reserved: use 1-64 lower-case letters, "
            "digits, '.', '_', '-', starting with a letter or digit (not 'host')"
        )


class TemplateCatalog:
    """A process's view of the templates: one per server (or worker) process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        engine: Engine,
        *,
        layers: LayerStore | None = None,
        queue: BuildQueue | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.layers = layers or LayerStore(settings.data_dir / "templates")
        self.queue = queue
        # The sandboxes `snapshot` reads (the server's manager, set at its start).
        self.manager: SandboxManager | None = None
        self.contexts = self.layers.root / "contexts"
        self.contexts.mkdir(mode=0o700, exist_ok=True)
        # The row each (team, name) this process serves is registered as.
        self._serving_ids: dict[tuple[str, str], str] = {}
        # `base` for the teams that have none of their own (corral.templates.base).
        self.server_base = server_base.ServerBase(
            self.layers, settings.debian_mirror, settings.base_template
        )

    # -- the engine's registry ------------------------------------------------------------

    def load(self) -> int:
        """Register every ready template with the engine (at start); how many."""
        seen: set[tuple[str, str]] = set()
        count = 0
        for row in self.store.ready_templates():  # newest first: the first of a name serves
            if (row.team_id, row.name) in seen:
                continue
            seen.add((row.team_id, row.name))
            try:
                self._register(row)
                count += 1
            except (UnknownLayer, InvalidRequest) as exc:
                log.error(
                    "a ready template cannot be served",
                    extra={"template": row.name, "team_id": row.team_id, "error": str(exc)},
                )
        log.info("templates loaded", extra={"count": count})
        if self.settings.base_template == "start" and self.server_base.record() is None:
            self.server_base.start_build()
        return count

    def _register(self, row: TemplateRow) -> None:
        shared = row.id.startswith(server_base.ID_PREFIX)  # the server's base: no team's
        if row.id not in self.engine.templates.names():
            self.engine.templates.add(
                row.id,
                self.layers,
                row.layers,
                env=row.env,
                workdir=row.workdir,
                user=account(row.user),
                start=row.start_cmd,
                ready=row.ready_cmd,
            )
        if shared:
            return
        # A version another process replaced (its row is gone) is let go here too.
        old = self._serving_ids.get((row.team_id, row.name))
        if old is not None and old != row.id and old in self.engine.templates.names():
            self.engine.templates.remove(old)
        self._serving_ids[(row.team_id, row.name)] = row.id

    def _unregister(self, row: TemplateRow) -> None:
        if row.id in self.engine.templates.names():
            self.engine.templates.remove(row.id)

    def resolve(self, team_id: str, name: str) -> str:
        """The engine's name of the team's ready template `name` ("host" stays "host"),
        registered now if another process built it. TemplateNotFound when the team has
        none ready by that name (another team's is not seen)."""
        if name in TEMPLATE_NAMES:
            return name
        row = self.serving(team_id, name)
        self._register(row)
        return row.id

    def defaults(self, team_id: str, name: str) -> SandboxDefaults:
        """What the team's ready template `name` gives a sandbox or job for what its
        request leaves unset (`host`: nothing). TemplateNotFound as `resolve`."""
        if name in TEMPLATE_NAMES:
            return SandboxDefaults()
        return row_defaults(self.serving(team_id, name))

    def serving(self, team_id: str, name: str) -> TemplateRow:
        rows = self.store.template_rows(team_id, name) if isinstance(name, str) else []
        for row in rows:
            if row.state == "ready":
                return row
        if rows:
            raise TemplateNotFound(
                f"template {name!r} is {rows[0].state}, not ready yet: wait for its build "
                f"(`corral template logs {name}`), or build it again"
            )
        if name == server_base.NAME:
            return self._server_base_row(team_id)
        raise TemplateNotFound(
            f"your team has no template {name!r}; list them with `corral template list`, "
            "or use 'host'"
        )

    def _server_base_row(self, team_id: str) -> TemplateRow:
        """The server's base as a ready row of the team's (never stored): what builds
        `FROM base` and sandboxes of `base` read. TemplateNotReady (its build started)
        until it is built."""
        record = self.server_base.record()
        if record is None:
            raise self.server_base.missing()
        built = datetime.fromtimestamp(record.built_at, UTC)
        return TemplateRow(
            id=record.template_id,
            team_id=team_id,
            name=server_base.NAME,
            state="ready",
            source="debian",
            layers=list(record.layers),
            env={},
            workdir=server_base.HOME,
            user=server_base.USER,
            start_cmd=None,
            ready_cmd=None,
            size_bytes=sum(self.layers.get(d).size_bytes for d in record.layers),
            build_job_id=None,
            steps_total=0,
            steps_cached=0,
            error=None,
            created_at=built,
            updated_at=built,
        )

    # -- the service ------------------------------------------------------------------------

    async def build(self, team: str, request: BuildRequest) -> TemplateRecord:
        """Check the request and the team's quotas, record the template `building` and
        queue its build job; returns at once. A name that exists keeps serving its ready
        version until the new one is ready."""
        check_name(request.name)
        if request.source not in SOURCES or request.source == "snapshot":
            raise InvalidRequest(
                f"source {request.source!r} is not a build source; use one of "
                f"{', '.join(s for s in SOURCES if s != 'snapshot')}"
            )
        timeout = request.ready_timeout_s
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_READY_TIMEOUT:
            raise InvalidRequest(
                f"ready_timeout_s={timeout!r}: give seconds, more than 0 and at most "
                f"{MAX_READY_TIMEOUT:g}"
            )
        self._check_base(team, request.plan)
        # The team's name: the server's network cap names teams (CORRAL_NETWORK_*).
        team_name = self.store.team_by_id(team).name
        self.settings.network_cap().check(request.network, team_name)
        request.defaults.check(self.settings.network_cap(), team_name)
        if self.queue is None:
            raise InvalidRequest("this process runs no job queue: builds go to `corral server`")
        now = datetime.now(UTC)
        row = TemplateRow(
            id=new_template_id(),
            team_id=team,
            name=request.name,
            state="building",
            source=request.source,
            layers=[],
            env={},
            workdir=None,
            user="root",
            start_cmd=None,
            ready_cmd=None,
            size_bytes=0,
            build_job_id=None,
            steps_total=len(request.plan.steps),
            steps_cached=0,
            error=None,
            created_at=now,
            updated_at=now,
            request={
                "plan": plan_to_dict(request.plan),
                "network": {"mode": request.network.mode, "allow": list(request.network.entries)},
                "ready_timeout_s": float(timeout),
                "context": request.context is not None,
            },
            sandbox_limits=request.defaults.limits_json(),
            sandbox_network=request.defaults.network_json(),
        )
        self.store.insert_template(row, **self._quotas())  # QuotaExceeded names the setting
        try:
            if request.context is not None:
                self._write_context(row.id, request.context)
            job_id = await self.queue.submit_build(team, row.id, row.name)
        except BaseException:
            self.store.delete_templates(team, row.name, only=row.id)
            self.context_path(row.id).unlink(missing_ok=True)
            raise
        updated = self.store.update_template(row.id, build_job_id=job_id)
        return TemplateRecord.from_row(updated or row)

    def _check_base(self, team: str, plan: BuildPlan) -> None:
        if plan.base.kind == "template" and plan.base.ref in TEMPLATE_NAMES:
            raise InvalidRequest(
                f"a build cannot start from {plan.base.ref!r}: it has no layers (it is "
                "the host's /usr); start from a Debian base, an image, another template "
                "or scratch"
            )
        if plan.base.kind == "image" and plan.base.ref.startswith(LOCAL_TRANSPORTS):
            self._check_archive_path(plan.base.ref)
        self.base_template(team, plan.base)

    def _check_archive_path(self, reference: str) -> None:
        """Refuse a local image archive outside the operator's CORRAL_IMAGE_ARCHIVE_DIRS
        (before anything says whether the path exists)."""
        transport = next(t for t in LOCAL_TRANSPORTS if reference.startswith(t))
        path = reference.removeprefix(transport).partition(":")[0]
        dirs = [d.strip() for d in self.settings.image_archive_dirs.split(",") if d.strip()]
        allowed = [Path(os.path.realpath(d)) for d in dirs]
        real = Path(os.path.realpath(path)) if path.startswith("/") else None
        if real is None or not any(real.is_relative_to(d) for d in allowed):
            where = ", ".join(map(str, allowed)) or "none"
            raise Forbidden(
                f"{reference!r}: builds import local image archives only from the "
                f"directories the server's operator lists in CORRAL_IMAGE_ARCHIVE_DIRS "
                f"(now: {where}), by absolute path; or push the image to a registry and "
                "use HOST/NAME:TAG"
            )

    def base_template(self, team: str, base: Base) -> TemplateRow | None:
        """The team's ready template a build starts from: a `template` base, or an
        `image` base named like one of the team's templates (`FROM app` in a Dockerfile,
        as Docker prefers a local image); None for any other base."""
        if base.kind == "template":
            return self.serving(team, base.ref)
        if (
            base.kind == "image"
            and _NAME.fullmatch(base.ref)
            and self.store.template_rows(team, base.ref)
        ):
            return self.serving(team, base.ref)
        return None

    def _quotas(self) -> dict[str, int]:
        return {
            "max_count": self.settings.template_max_count,
            "max_bytes": self.settings.template_max_bytes,
        }

    def context_path(self, template_id: str) -> Path:
        return self.contexts / f"{template_id}.tar"

    def _write_context(self, template_id: str, context: bytes) -> None:
        path = self.context_path(template_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out:
            out.write(context)

    async def get(self, team: str, name: str) -> TemplateRecord:
        """The newest build of the team's template `name` (its state may be building or
        failed while an older ready one still serves)."""
        rows = self.store.template_rows(team, name) if isinstance(name, str) else []
        if not rows:
            raise self._not_found(name)
        return self._record(self._settled(rows[0]))

    async def list(self, team: str) -> list[TemplateRecord]:
        """The team's templates by name, each its newest build."""
        newest: dict[str, TemplateRow] = {}
        for row in self.store.template_rows(team):
            newest.setdefault(row.name, row)
        return [self._record(self._settled(newest[name])) for name in sorted(newest)]

    def _record(self, row: TemplateRow) -> TemplateRecord:
        """`row` as the service shows it, with the memory images of the version that
        serves its name (a newer build still building has none yet)."""
        serving = row
        if row.state != "ready":
            rows = self.store.template_rows(row.team_id, row.name)
            serving = next((r for r in rows if r.state == "ready"), row)
        found = memory_templates.images(self.settings.data_dir, row.team_id, serving.id)
        return dataclasses.replace(TemplateRecord.from_row(row), memory_images=tuple(found))

    def _settled(self, row: TemplateRow) -> TemplateRow:
        """`row`, failed now if it is building but its build job ended without ending it
        (its worker died and the job was lost, or the job was deleted)."""
        if row.state != "building" or row.build_job_id is None:
            return row
        job = self.store.job(row.build_job_id)
        if job is not None and not job.final:
            return row
        why = f"its build job {job.state}: {job.state_reason}" if job else "its build job is gone"
        state = "cancelled" if job is not None and job.state == "canceled" else "failed"
        done, _ = self.finish(row.id, state, error=f"the build did not finish: {why}")
        return done or self.store.template(row.id) or row

    async def delete(self, team: str, name: str) -> None:
        """Delete the team's template `name` (every build of it, a running build
        cancelled); refused with TemplateInUse, naming them, while live sandboxes use it."""
        rows = self.store.template_rows(team, name) if isinstance(name, str) else []
        if not rows:
            raise self._not_found(name)
        users = self.users(team, name, rows)
        if users:
            raise TemplateInUse(
                f"template {name!r} is used by live sandboxes {', '.join(users)}: kill them "
                "first (`corral sandbox kill ID`), then delete it"
            )
        for row in rows:
            if row.state == "building" and row.build_job_id and self.queue is not None:
                self.queue.cancel_build(row.build_job_id, f"template {name!r} was deleted")
        self.drop(self.store.delete_templates(team, name))
        await asyncio.to_thread(self.collect)

    def users(self, team: str, name: str, rows: Sequence[TemplateRow]) -> Sequence[str]:
        """The live sandboxes (the team's, and any job's in this process) of `name`."""
        ids = {row.id for row in rows}
        users = set(self.store.live_sandboxes_of_template(team, name))
        users.update(s.id for s in self.engine.sandboxes.values() if s.spec.template in ids)
        return sorted(users)

    def collect(self, *, min_age: float = 600.0) -> Sequence[str]:
        """Remove the stored layers no template row names and nothing holds (a running
        build or sandbox), stored more than `min_age` seconds ago: those of deleted,
        replaced, failed and cancelled builds. The build cache forgets them (a later build
        makes them again). The digests removed."""
        keep = self.store.template_layers()
        if (record := self.server_base.record()) is not None:
            keep |= set(record.layers)
        removed = self.layers.collect(keep, min_age=min_age)
        if removed:
            self.store.forget_cached(removed)
            log.info("layers collected", extra={"count": len(removed)})
        return removed

    def drop(self, rows: Sequence[TemplateRow]) -> None:
        """Forget deleted or replaced rows: unregister them and release their layers
        (`collect` removes the layers no template uses any more)."""
        for row in rows:
            self._unregister(row)
            self.context_path(row.id).unlink(missing_ok=True)
            memory_templates.remove(self.settings.data_dir, row.id)

    def _not_found(self, name: str) -> TemplateNotFound:
        return TemplateNotFound(
            f"your team has no template {name!r}; list them with `corral template list`"
        )

    async def snapshot(
        self, team: str, sandbox_id: str, name: str, *, flatten: bool = False
    ) -> TemplateRecord:
        """A ready template `name` of the team's live sandbox's `/` as it is now: its
        template's layers and one of what it changed (or, with `flatten`, all of it merged
        into one layer), with its template's environment, working directory and user
        (replacing the team's template of that name). Its row's `request` names the
        sandbox (`{"sandbox_id": …}`), so snapshots can be listed by their source."""
        check_name(name)
        if self.manager is None:
            raise InvalidRequest("this process runs no sandboxes to snapshot; ask the server")
        digests, sandbox = await self.manager.snapshot(
            team, sandbox_id, self.layers, self.settings.template_max_bytes
        )
        rootfs = sandbox.spec.rootfs
        assert rootfs is not None  # Sandbox.snapshot refuses a sandbox of `host`
        # The defaults of the build the sandbox started from (its row, even if replaced
        # since, is in the engine under its id; gone from the store: none).
        source = self.store.template(sandbox.spec.template)
        defaults = row_defaults(source) if source is not None else SandboxDefaults()
        if flatten:
            # The snapshot's own top layer is left for `collect`: no row names it.
            merged = await asyncio.to_thread(
                flatten_layers, self.layers, digests, max_bytes=self.settings.template_max_bytes
            )
            digests = (merged.digest,)
        return await asyncio.to_thread(
            self.add_layers,
            team,
            name,
            digests,
            source="snapshot",
            env=rootfs.env,
            workdir=rootfs.workdir,
            user=rootfs.user,  # a USER's template snapshots as that user, not as root
            defaults=defaults,
            start=rootfs.start,  # its sandboxes start what the sandbox's template did
            ready=rootfs.ready,
            request={"sandbox_id": sandbox_id},
        )

    # -- templates made of stored layers ----------------------------------------------------

    def add_layers(
        self,
        team: str,
        name: str,
        digests: Sequence[str],
        *,
        source: str,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str = "root",
        defaults: SandboxDefaults | None = None,
        start: str | None = None,
        ready: str | None = None,
        request: Mapping[str, Any] | None = None,
    ) -> TemplateRecord:
        """Record a ready template of layers already in the store (a Debian base, a
        snapshot), replacing the team's template of that name; its sandboxes run as
        `user`. `request` is kept in its row: where it came from."""
        check_name(name)
        if source not in SOURCES:
            raise InvalidRequest(f"source {source!r} is unknown; use one of {', '.join(SOURCES)}")
        size = sum(self.layers.get(d).size_bytes for d in digests)  # UnknownLayer if not
        now = datetime.now(UTC)
        row = TemplateRow(
            id=new_template_id(),
            team_id=team,
            name=name,
            state="building",
            source=source,
            layers=list(digests),
            env=dict(env or {}),
            workdir=workdir,
            user=user,
            start_cmd=start,
            ready_cmd=ready,
            size_bytes=size,
            build_job_id=None,
            steps_total=0,
            steps_cached=0,
            error=None,
            created_at=now,
            updated_at=now,
            sandbox_limits=defaults.limits_json() if defaults else {},
            sandbox_network=defaults.network_json() if defaults else None,
        )
        self.store.insert_template(row, **self._quotas())  # QuotaExceeded names the setting
        try:
            made, _ = self.finish(row.id, "ready", request=dict(request or {}))
        except BaseException:
            self.store.delete_templates(team, name, only=row.id)
            raise
        assert made is not None
        return TemplateRecord.from_row(made)

    def finish(
        self, template_id: str, state: str, **changes: Any
    ) -> tuple[TemplateRow | None, Sequence[TemplateRow]]:
        """End a build in `state`; a ready one is registered and replaces the older rows
        of its name (unregistered, layers released). (None, []) when the row was deleted
        or cancelled meanwhile. QuotaExceeded (nothing changed) past the byte quota."""
        if state == "ready":
            row = self.store.template(template_id)
            if row is not None:  # registered before the row says ready: served at once
                layers = changes.get("layers", row.layers)
                assert isinstance(layers, list)
                self.engine.templates.add(
                    row.id,
                    self.layers,
                    layers,
                    env=changes.get("env", row.env),
                    workdir=changes.get("workdir", row.workdir),
                    user=account(str(changes.get("user", row.user))),
                    start=cast("str | None", changes.get("start_cmd", row.start_cmd)),
                    ready=cast("str | None", changes.get("ready_cmd", row.ready_cmd)),
                )
        try:
            done, old = self.store.finish_template(template_id, state, **self._quotas(), **changes)
        except BaseException:
            self._forget(template_id)
            raise
        if done is None or done.state != "ready":
            self._forget(template_id)
        else:
            self._serving_ids[(done.team_id, done.name)] = done.id
        self.context_path(template_id).unlink(missing_ok=True)
        self.drop(old)
        return done, old

    def _forget(self, template_id: str) -> None:
        if template_id in self.engine.templates.names():
            self.engine.templates.remove(template_id)


def row_defaults(row: TemplateRow) -> SandboxDefaults:
    return SandboxDefaults.from_json(row.sandbox_limits, row.sandbox_network)


def account(user: str) -> str:
    """The account a USER value names for a sandbox (`app:app` -> `app`; empty: root)."""
    return user.partition(":")[0] or "root"


def command_text(argv: Sequence[str]) -> str | None:
    """A start or ready command as the row keeps it: the shell text of a `sh -c` form,
    else the argv quoted."""
    if not argv:
        return None
    if len(argv) == 3 and argv[0] in ("/bin/sh", "sh") and argv[1] == "-c":
        return argv[2]
    return shlex.join(argv)
