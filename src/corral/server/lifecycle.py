"""SandboxService RPCs of a sandbox's life: create, get, list, kill, pause, resume, timeouts,
metrics and network events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, cast

from connectrpc.request import RequestContext

from corral._state_enums import SANDBOX_STATE_NAMES
from corral.errors import InvalidRequest
from corral.sandboxes import CreateOptions
from corral.server import convert, disconnect
from corral.server.base import Handlers, Services
from corral.templates.defaults import SandboxDefaults
from corral.v1 import sandbox_pb2 as pb

Ctx = RequestContext[Any, Any]


def template_defaults(services: Services, team_id: str, template: str) -> SandboxDefaults:
    """The defaults of the team's template (none for `host`, or a server without a
    catalog, whose manager serves only `host`)."""
    catalog = services.templates
    if catalog is None or template == "host":
        return SandboxDefaults()
    return catalog.defaults(team_id, template)  # TemplateNotFound: not the team's


class LifecycleHandlers(Handlers):
    async def create(self, request: pb.CreateRequest, ctx: Ctx) -> pb.CreateResponse:
        team = self._team(ctx)
        convert.not_negative(request.timeout_seconds, "timeout_seconds")
        convert.not_negative(request.idle_timeout_seconds, "idle_timeout_seconds")
        if request.on_idle not in convert.IDLE_ACTION_NAMES:
            raise InvalidRequest(f"on_idle={request.on_idle} is not an IdleAction")
        template = request.template or "host"
        # What the request leaves unset takes the template's defaults; the manager checks
        # the result against the server's caps like any request.
        defaults = template_defaults(self._services, team.id, template)
        options = CreateOptions(
            template=template,
            isolation=request.isolation or "auto",
            limits=defaults.limits_for(convert.given_limits(request.limits)),
            envs=convert.strings(dict(request.envs), "envs"),
            metadata=convert.strings(dict(request.metadata), "metadata"),
            timeout_seconds=request.timeout_seconds or 300,
            idle_timeout_seconds=request.idle_timeout_seconds,
            on_idle=cast(Literal["pause", "kill"], convert.IDLE_ACTION_NAMES[request.on_idle]),
            network=defaults.network_for(convert.given_network(request.network)),
            public_ports=request.public_ports,
            volumes=convert.volume_specs(request.volumes),
            ram_disk=request.ram_disk,
        )
        record = await self._manager.create(team, options)
        return pb.CreateResponse(sandbox=convert.sandbox(record))

    async def get(self, request: pb.GetRequest, ctx: Ctx) -> pb.GetResponse:
        team = self._team(ctx)
        record = await self._manager.get(team, convert.sandbox_id(request.sandbox_id))
        return pb.GetResponse(sandbox=convert.sandbox(record))

    async def list(self, request: pb.ListRequest, ctx: Ctx) -> pb.ListResponse:
        team = self._team(ctx)
        states = convert.states(request.states, SANDBOX_STATE_NAMES, "SandboxState")
        page_size = convert.page_size(request.page_size)
        records, next_token = await self._manager.list(
            team,
            states=tuple(states),
            metadata=convert.strings(dict(request.metadata), "metadata") or None,
            page_size=page_size,
            page_token=request.page_token,
        )
        return pb.ListResponse(
            sandboxes=[convert.sandbox(r) for r in records], next_page_token=next_token
        )

    async def kill(self, request: pb.KillRequest, ctx: Ctx) -> pb.KillResponse:
        team = self._team(ctx)
        await self._manager.kill(team, convert.sandbox_id(request.sandbox_id))
        return pb.KillResponse()

    async def pause(self, request: pb.PauseRequest, ctx: Ctx) -> pb.PauseResponse:
        team = self._team(ctx)
        keep_memory = not request.HasField("keep_memory") or request.keep_memory
        record = await self._manager.pause(
            team, convert.sandbox_id(request.sandbox_id), keep_memory=keep_memory
        )
        return pb.PauseResponse(sandbox=convert.sandbox(record))

    async def resume(self, request: pb.ResumeRequest, ctx: Ctx) -> pb.ResumeResponse:
        team = self._team(ctx)
        record = await self._manager.resume(team, convert.sandbox_id(request.sandbox_id))
        return pb.ResumeResponse(sandbox=convert.sandbox(record))

    async def set_timeout(self, request: pb.SetTimeoutRequest, ctx: Ctx) -> pb.SetTimeoutResponse:
        team = self._team(ctx)
        convert.not_negative(request.timeout_seconds, "timeout_seconds")
        record = await self._manager.set_timeout(
            team, convert.sandbox_id(request.sandbox_id), request.timeout_seconds
        )
        return pb.SetTimeoutResponse(sandbox=convert.sandbox(record))

    async def update_network(
        self, request: pb.UpdateNetworkRequest, ctx: Ctx
    ) -> pb.UpdateNetworkResponse:
        team = self._team(ctx)
        record = await self._manager.update_network(
            team, convert.sandbox_id(request.sandbox_id), convert.network(request.network)
        )
        return pb.UpdateNetworkResponse(sandbox=convert.sandbox(record))

    async def ping(self, request: pb.PingRequest, ctx: Ctx) -> pb.PingResponse:
        team = self._team(ctx)
        await self._manager.ping(team, convert.sandbox_id(request.sandbox_id))
        return pb.PingResponse()

    async def get_metrics(self, request: pb.GetMetricsRequest, ctx: Ctx) -> pb.GetMetricsResponse:
        team = self._team(ctx)
        if request.range not in convert.METRICS_RANGES:
            raise InvalidRequest(f"range={request.range} is not a MetricsRange")
        resolution = cast(Literal["10m", "2h", "24h"], convert.METRICS_RANGES[request.range])
        points = await self._manager.metrics(
            team, convert.sandbox_id(request.sandbox_id), resolution
        )
        return pb.GetMetricsResponse(points=[convert.metric_point(p) for p in points])

    async def stream_events(
        self, request: pb.StreamEventsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.StreamEventsResponse]:
        team = self._team(ctx)
        batches = self._manager.network_events(
            team,
            convert.sandbox_id(request.sandbox_id),
            offset=request.offset,
            follow=request.follow,
            stop=disconnect.current(),  # an abandoned follow ends with its client
        )
        async for rows, dropped in batches:
            yield pb.StreamEventsResponse(
                events=[convert.network_event(r) for r in rows], dropped=dropped
            )
