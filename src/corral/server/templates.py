"""TemplateService: template builds and the templates they make, over `TemplateCatalog`.

This is the one place a build's source is parsed: a Dockerfile, a YAML recipe or E2B's
builder JSON becomes a `BuildPlan` here (corral.images' parsers, with the build context
unpacked into a scratch directory so COPY sources can be checked and digested), so a bad
one is refused before the catalog makes anything. A build's logs and progress are its
job's (`build_job_id`): StreamBuildLogs follows both through the job queue.
"""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connectrpc.request import RequestContext

from corral._state_enums import TEMPLATE_STATE_NUMBERS
from corral.errors import (
    InvalidBuild,
    InvalidLayer,
    InvalidRequest,
    QuotaExceeded,
    ServerUnavailable,
)
from corral.images import (
    Base,
    BuildContext,
    BuildPlan,
    BuildStep,
    parse_dockerfile,
    parse_e2b_template,
    parse_recipe,
)
from corral.images._archive import unpack
from corral.images.oci import registry_host
from corral.jobs.callback_policy import CallbackPolicy
from corral.limits import BUILD_CONTEXT_MAX_BYTES, check_build_context
from corral.server import convert, disconnect
from corral.server.base import Handlers
from corral.server.jobs import CANCEL_WAIT, chunk_message, event_message
from corral.v1 import templates_pb2 as pb

if TYPE_CHECKING:
    from corral.jobs.queue import JobQueue
    from corral.store import Team
    from corral.store.job_rows import JobEventRow
    from corral.templates import BuildRequest, TemplateCatalog, TemplateRecord

Ctx = RequestContext[Any, Any]

_SHELL = ("/bin/sh", "-c")
_SOURCES = "dockerfile, recipe, e2b_template, image or debian"
# How a source is named in the template's record (TemplateRecord.source).
_SOURCE_NAMES = {
    "dockerfile": "dockerfile",
    "recipe": "recipe",
    "e2b_template": "e2b",
    "image": "image",
    "debian": "debian",
}


def template_message(record: TemplateRecord) -> pb.Template:
    return pb.Template(
        team=record.team,
        name=record.name,
        state=TEMPLATE_STATE_NUMBERS[record.state],
        source=record.source,
        layers=list(record.layers),
        env=dict(record.env),
        workdir=record.workdir or "",
        user=record.user,
        start_cmd=record.start_cmd or "",
        ready_cmd=record.ready_cmd or "",
        size_bytes=record.size_bytes,
        build_job_id=record.build_job_id or "",
        steps_total=record.steps_total,
        steps_cached=record.steps_cached,
        error=record.error or "",
        created_at=convert.timestamp(record.created_at),
        updated_at=convert.timestamp(record.updated_at),
        sandbox_limits=convert.limits_message(record.defaults.limits),
        sandbox_network=(
            convert.network_message(record.defaults.network) if record.defaults.network else None
        ),
        memory_images=[
            pb.MemoryImage(
                isolation=image.tier,
                memory_mib=image.memory_mib,
                cpu=image.cpu,
                network=image.network,
                ram_disk=image.ram_disk,
                size_bytes=image.size_bytes,
                created_at=convert.timestamp(image.created_at),
            )
            for image in record.memory_images
        ],
    )


# -- parsing a build request ---------------------------------------------------------------


def unpack_context(data: bytes, scratch: Path) -> BuildContext:
    """The context tar unpacked under `scratch`, with the checks of a layer (no `..`, no
    writes through symlinks, devices dropped): a context is as untrusted as an image."""
    check_build_context(len(data))
    root = scratch / "context"
    root.mkdir()
    try:
        unpack(io.BytesIO(data), root, max_bytes=BUILD_CONTEXT_MAX_BYTES)
    except InvalidLayer as exc:
        text = str(exc).replace("the layer's", "its").replace("the layer", "it")
        raise InvalidBuild(f"the build context (a tar) was refused: {text}") from None
    except QuotaExceeded:
        raise InvalidBuild(
            f"the build context unpacks to more than {BUILD_CONTEXT_MAX_BYTES} bytes "
            "(a compressed tar); send at most that much, uncompressed"
        ) from None
    return BuildContext(root)


def _e2b(text: str, context: BuildContext | None) -> BuildPlan:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidBuild(
            f"e2b_template is not JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "send TemplateBase.to_json()"
        ) from None
    return parse_e2b_template(doc, context)


def parse_plan(request: pb.BuildTemplateRequest, scratch: Path) -> tuple[BuildPlan, str]:
    """The build plan of `request` and its source's name; InvalidBuild/InvalidRequest
    naming what is wrong (the line, for a Dockerfile or recipe)."""
    which = request.WhichOneof("source")
    if which is None:
        raise InvalidRequest(f"say what to build from: one of {_SOURCES}")
    if request.build_args and which != "dockerfile":
        raise InvalidRequest(
            "build_args are a Dockerfile's ARG values: give them with a dockerfile"
        )
    takes_context = which in ("dockerfile", "recipe", "e2b_template")
    if request.context and not takes_context:
        raise InvalidRequest(f"a build from {which} has no COPY steps: send no context")
    context = unpack_context(request.context, scratch) if request.context else None
    if which == "dockerfile":
        plan = parse_dockerfile(request.dockerfile, context, dict(request.build_args))
    elif which == "recipe":
        plan = parse_recipe(request.recipe, context)
    elif which == "e2b_template":
        plan = _e2b(request.e2b_template, context)
    elif which == "image":
        image = request.image
        if not image.reference.strip():
            raise InvalidRequest("image.reference is empty: name an image (registry/name:tag)")
        base = Base("image", image.reference, image.username, image.password)
        plan = BuildPlan(base, ())
    else:
        plan = _debian_plan(request.debian)
    if request.ready_cmd:
        ready = BuildStep("ready", (*_SHELL, request.ready_cmd), len(plan.steps) + 1)
        plan = replace(plan, steps=(*plan.steps, ready))
    return plan, _SOURCE_NAMES[which]


def build_request(request: pb.BuildTemplateRequest) -> BuildRequest:
    """The catalog's request for `request`: its source parsed, its options checked."""
    from corral.templates import BuildRequest
    from corral.templates.defaults import SandboxDefaults

    if request.ready_timeout_seconds < 0:
        raise InvalidRequest("ready_timeout_seconds must be >= 0 (0: 60 s)")
    with tempfile.TemporaryDirectory(prefix="corral-context-") as scratch:
        plan, source = parse_plan(request, Path(scratch))
    # The request's fields win over the recipe's keys, each on its own.
    asked = SandboxDefaults(
        convert.given_limits(request.sandbox_limits, "sandbox_limits"),
        convert.given_network(request.sandbox_network),
    )
    return BuildRequest(
        name=request.name,
        plan=plan,
        source=source,
        context=request.context or None,
        network=convert.network(request.network),
        ready_timeout_s=request.ready_timeout_seconds or 60,
        defaults=asked.over(SandboxDefaults.from_recipe(plan.sandbox)),
    )


def _debian_plan(debian: pb.DebianSource) -> BuildPlan:
    """A Debian base; suite, variant and packages are checked by the builder's bootstrap
    (corral.images.debian) before mmdebstrap runs, and here first, so a typo is refused
    before anything is made."""
    from corral.images.debian import DEFAULT_MIRROR, _check

    variant = debian.variant or "apt"
    _check(debian.suite, variant, list(debian.packages), DEFAULT_MIRROR)  # the mirror: ours
    base = Base("debian", debian.suite, variant=variant, packages=tuple(debian.packages))
    return BuildPlan(base, ())


async def check_registry(catalog: TemplateCatalog, team_id: str, base: Base) -> None:
    """A build's image comes from a public registry, or one the operator allows: the
    server fetches it from its own network (no SSRF through FROM)."""
    if base.kind != "image" or catalog.base_template(team_id, base) is not None:
        return
    host = registry_host(base.ref)
    if host is not None:
        allow = catalog.settings.registry_allow
        policy = CallbackPolicy.parse(allow, setting="CORRAL_REGISTRY_ALLOW", field="image")
        await policy.check(f"https://{host}/")


class TemplateHandlers(Handlers):
    """Every RPC of `corral.v1.TemplateService`."""

    @property
    def _catalog(self) -> TemplateCatalog:
        if self._services.templates is None:
            raise ServerUnavailable("the Corral server is starting or stopping; try again")
        return self._services.templates

    async def build(self, request: pb.BuildTemplateRequest, ctx: Ctx) -> pb.BuildTemplateResponse:
        team = self._team(ctx)
        catalog = self._catalog
        build = await asyncio.to_thread(build_request, request)
        await check_registry(catalog, team.id, build.plan.base)
        record = await catalog.build(team.id, build)
        return pb.BuildTemplateResponse(template=template_message(record))

    async def get(self, request: pb.GetTemplateRequest, ctx: Ctx) -> pb.GetTemplateResponse:
        team = self._team(ctx)
        record = await self._catalog.get(team.id, request.name)
        return pb.GetTemplateResponse(template=template_message(record))

    async def list(self, request: pb.ListTemplatesRequest, ctx: Ctx) -> pb.ListTemplatesResponse:
        team = self._team(ctx)
        records = await self._catalog.list(team.id)
        return pb.ListTemplatesResponse(templates=[template_message(r) for r in records])

    async def delete(
        self, request: pb.DeleteTemplateRequest, ctx: Ctx
    ) -> pb.DeleteTemplateResponse:
        team = self._team(ctx)
        await self._catalog.delete(team.id, request.name)
        return pb.DeleteTemplateResponse()

    async def snapshot(
        self, request: pb.SnapshotSandboxRequest, ctx: Ctx
    ) -> pb.SnapshotSandboxResponse:
        team = self._team(ctx)
        record = await self._catalog.snapshot(
            team.id, request.sandbox_id, request.name, flatten=request.flatten
        )
        return pb.SnapshotSandboxResponse(template=template_message(record))

    async def cancel(self, request: pb.CancelBuildRequest, ctx: Ctx) -> pb.CancelBuildResponse:
        team = self._team(ctx)
        record = await self._catalog.get(team.id, request.name)
        if record.state == "building" and record.build_job_id:
            job = self._jobs.cancel(team, record.build_job_id, "build cancelled")
            if not job.final:  # running: answer once its worker has stopped it, if soon
                await self._jobs.wait_final(job.id, CANCEL_WAIT)
            record = await self._catalog.get(team.id, request.name)
        return pb.CancelBuildResponse(template=template_message(record))

    async def stream_build_logs(
        self, request: pb.StreamBuildLogsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.StreamBuildLogsResponse]:
        team = self._team(ctx)
        record = await self._catalog.get(team.id, request.name)
        if request.offset < 0 or request.event_offset < 0:
            raise InvalidRequest("offset and event_offset must be >= 0")
        if not record.build_job_id:  # a snapshot: made at once, nothing to show
            yield pb.StreamBuildLogsResponse(final_state=TEMPLATE_STATE_NUMBERS[record.state])
            return
        stream = _BuildStream(self._jobs, team, record.build_job_id, request)
        async for message in stream.messages():
            if message.HasField("final_state"):  # the job ended: the template's state now
                final = await self._catalog.get(team.id, request.name)
                message.final_state = TEMPLATE_STATE_NUMBERS[final.state]
            yield message

    @property
    def _jobs(self) -> JobQueue:
        if self._services.jobs is None:
            raise ServerUnavailable("the Corral server is starting or stopping; try again")
        return self._services.jobs


class _BuildStream:
    """A build job's log chunks and events in one stream: two follows of the job queue
    feeding one queue, each from its own offset. Each message labels the steps its chunks
    belong to, with the names their `step_start` events gave them."""

    def __init__(
        self, queue: JobQueue, team: Team, job_id: str, request: pb.StreamBuildLogsRequest
    ) -> None:
        self._queue = queue
        self._team = team
        self._job_id = job_id
        self._request = request
        self._labels: dict[int, str] = {}

    async def messages(self) -> AsyncIterator[pb.StreamBuildLogsResponse]:
        """Messages until both follows end; the last one has `final_state` set (to be
        filled in by the caller) when they ended because the job did."""
        request, stop = self._request, disconnect.current()
        inbox: asyncio.Queue[tuple[str, list[Any], bool] | BaseException] = asyncio.Queue()

        async def pump(kind: str, batches: AsyncIterator[tuple[list[Any], Any]]) -> None:
            try:
                job_ended = False
                async for rows, final in batches:
                    job_ended = job_ended or final is not None
                    await inbox.put((kind, rows, False))
                await inbox.put((kind + ":end", [], job_ended))
            except BaseException as exc:  # handed to the reader, which raises it
                await inbox.put(exc)

        queue, team, job_id, follow = self._queue, self._team, self._job_id, request.follow
        logs = queue.follow_logs(team, job_id, offset=request.offset, follow=follow, stop=stop)
        events = queue.follow_events(
            team, job_id, offset=request.event_offset, follow=follow, stop=stop
        )
        tasks = [
            asyncio.create_task(pump("logs", logs)),
            asyncio.create_task(pump("events", events)),
        ]
        ended: dict[str, bool] = {}
        try:
            while len(ended) < 2:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise item
                kind, rows, job_ended = item
                if kind.endswith(":end"):
                    ended[kind] = job_ended
                    if len(ended) == 2 and all(ended.values()):
                        yield pb.StreamBuildLogsResponse(final_state=pb.TEMPLATE_STATE_BUILDING)
                    continue
                if not rows:
                    continue
                message = pb.StreamBuildLogsResponse()
                if kind == "events":
                    self._learn(rows)
                    message.events.extend(event_message(r) for r in rows)
                else:
                    message.chunks.extend(chunk_message(r) for r in rows)
                    for step in sorted({r.step for r in rows}):
                        message.step_labels[step] = self._label(step)
                yield message
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _learn(self, rows: list[JobEventRow]) -> None:
        for row in rows:
            if row.type == "step_start" and "step" in row.data:  # reason: "step i/N RUN …"
                self._labels[int(row.data["step"])] = row.reason

    def _label(self, step: int) -> str:
        """The step's name; a chunk can come before its step's event has been followed
        (or from before `event_offset`): then the events are read for it."""
        if step not in self._labels:
            offset = 0
            while batch := self._queue.store.job_events(self._job_id, offset, 1000):
                self._learn(batch)
                offset = batch[-1].seq + 1
        return self._labels.get(step) or f"step {step}"
