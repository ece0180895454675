"""E2B's sandbox lifecycle routes over the sandbox manager: create, get, list, kill,
timeout, pause, connect, resume and refresh.

E2B's semantics where they differ from Corral's own API:
- an ended (killed, timed out, failed) sandbox is not found (404), and never listed;
- `timeout` 0 ends the sandbox at once; connect and refresh only extend its deadline;
- `autoPause` pauses the sandbox at its deadline instead of killing it, and it stays
  paused until it is connected to (resumed) or killed;
- pausing a paused sandbox is 409; connecting to a paused one resumes it (201);
- `pause {"memory": false}` and `autoPauseMemory: false` pause to disk (files kept,
  processes ended, memory released; the resume is a cold boot with a new boot id), and
  a sandbox paused to disk is kept past its deadline until it is killed.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from corral.errors import InvalidRequest, NotFound, SandboxNotRunning, ServerUnavailable
from corral.sandboxes import CreateOptions
from corral.sandboxes.options import check_timeout
from corral.server.e2b import network
from corral.server.e2b.errors import E2bError
from corral.server.e2b.rest import RestRequest, RestResponse, Route
from corral.server.e2b.sandboxes import detail, listed, new_row, sandbox_body
from corral.server.lifecycle import template_defaults
from corral.volumes import VolumeSpec

if TYPE_CHECKING:
    from corral.sandboxes import SandboxManager, SandboxRecord
    from corral.server.base import Services
    from corral.store import Store, Team
    from corral.store.e2b import E2bSandboxRow

DEFAULT_TEMPLATE = "base"
DEFAULT_TIMEOUT = 300  # the SDK's default; also when a connect names none
REFRESH_SECONDS = 15  # E2B's default keep-alive of a refresh without a duration
MAX_LIST_LIMIT = 100
_E2B_STATES = ("running", "paused")


# -- reading bodies ----------------------------------------------------------------------------


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise E2bError(400, f"{name} must be a JSON object")
    return value


def _bool(body: dict[str, Any], name: str, default: bool, label: str = "") -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise E2bError(400, f"{label or name} must be true or false, got {value!r}")
    return value


def _seconds(body: dict[str, Any], name: str, default: int, *, zero_ok: bool = False) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    return check_timeout(value, name, zero_ok=zero_ok)


def _strings(body: dict[str, Any], name: str) -> dict[str, str]:
    value = _object(body, name)
    for key, item in value.items():
        if not isinstance(item, str):
            raise E2bError(400, f"{name}[{key!r}] must be a string, got {item!r}")
    return value


# -- looking sandboxes up --------------------------------------------------------------------


def _manager(services: Services) -> tuple[SandboxManager, Store]:
    if services.manager is None or services.store is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    return services.manager, services.store


def _not_found(sandbox_id: str) -> E2bError:
    return E2bError(
        404, f"sandbox {sandbox_id!r} does not exist or has ended; list yours with Sandbox.list"
    )


async def _live(services: Services, team: Team, sandbox_id: str) -> SandboxRecord:
    """The team's running or paused sandbox, else 404 (another team's too)."""
    manager, _ = _manager(services)
    try:
        record = await manager.get(team, sandbox_id)
    except NotFound:
        raise _not_found(sandbox_id) from None
    if record.state not in ("creating", *_E2B_STATES):
        raise _not_found(sandbox_id)
    return record


def _row(services: Services, sandbox_id: str) -> E2bSandboxRow | None:
    _, store = _manager(services)
    return store.e2b_sandbox(sandbox_id)


# -- routes ------------------------------------------------------------------------------------


async def create(services: Services, req: RestRequest) -> RestResponse:
    manager, store = _manager(services)
    body = req.json_object()
    template = body.get("templateID", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or not template:
        raise E2bError(400, "templateID must be a template's name or id, e.g. 'base'")
    auto_resume = _object(body, "autoResume")
    if _bool(auto_resume, "enabled", False, "autoResume.enabled"):
        raise E2bError(
            400,
            "autoResume is not supported: Corral does not resume a paused sandbox on "
            "traffic; resume it with Sandbox.connect",
        )
    auto_pause = _bool(body, "autoPause", False)
    # false: its deadline pauses it to disk (a filesystem-only pause), not frozen
    auto_pause_memory = _bool(body, "autoPauseMemory", True)
    envs = _strings(body, "envVars")
    mounts = body.get("volumeMounts") or []
    if not isinstance(mounts, list):
        raise E2bError(400, "volumeMounts must be a list of {name, path}")
    defaults = template_defaults(services, req.team.id, template)
    options = CreateOptions(
        template=template,
        limits=defaults.limits_for({}),
        envs=envs,
        metadata=_strings(body, "metadata"),
        timeout_seconds=_seconds(body, "timeout", DEFAULT_TIMEOUT),
        on_timeout="pause" if auto_pause else "kill",
        pause_keeps_memory=auto_pause_memory,
        network=network.create_policy(body, defaults, manager.settings.e2b_network),
        public_ports=network.public_traffic(body),
        volumes=tuple(VolumeSpec.of(mount) for mount in mounts),
    )
    secure = _bool(body, "secure", False)
    record = await manager.create(req.team, options)
    row = new_row(record.id, secure=secure, alias=template, auto_pause=auto_pause, envs=envs)
    try:
        store.insert_e2b_sandbox(row)
    except BaseException:
        await manager.kill(req.team, record.id)
        raise
    return RestResponse(201, sandbox_body(record, row))


async def get(services: Services, req: RestRequest) -> RestResponse:
    record = await _live(services, req.team, req.params["sandboxID"])
    return RestResponse(200, detail(record, _row(services, record.id)))


async def list_v2(services: Services, req: RestRequest) -> RestResponse:
    states: tuple[str, ...] = _E2B_STATES
    if (state := req.arg("state")) is not None:
        states = tuple(s.strip() for s in state.split(",") if s.strip())
        unknown = [s for s in states if s not in _E2B_STATES]
        if unknown or not states:
            raise E2bError(400, f"state {state!r}: use running, paused or both (comma-separated)")
    order = req.arg("order") or "desc"
    if order not in ("asc", "desc"):
        raise E2bError(400, f"order {order!r}: use asc or desc")
    limit_text = req.arg("limit") or str(MAX_LIST_LIMIT)
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIST_LIMIT:
        raise E2bError(400, f"limit {limit_text!r}: use 1 to {MAX_LIST_LIMIT}")
    started_after = None
    if (after := req.arg("startedAfter")) is not None:
        try:
            started_after = datetime.fromisoformat(after)
        except ValueError:
            started_after = None
        if started_after is None or started_after.tzinfo is None:
            raise E2bError(
                400,
                f"startedAfter {after!r}: use an RFC 3339 time with a zone, e.g. "
                "2026-01-02T03:04:05Z",
            )
    return await _page(
        services,
        req,
        states=states,
        newest_first=order == "desc",
        limit=int(limit_text),
        started_after=started_after,
        template=req.arg("template") or None,
    )


async def list_v1(services: Services, req: RestRequest) -> RestResponse:
    """The deprecated list: every running sandbox, one page."""
    return await _page(services, req, states=("running",), newest_first=True, limit=0)


async def _page(
    services: Services,
    req: RestRequest,
    *,
    states: tuple[str, ...],
    newest_first: bool,
    limit: int,
    started_after: datetime | None = None,
    template: str | None = None,
) -> RestResponse:
    manager, store = _manager(services)
    metadata = _metadata_query(req.arg("metadata") or "")
    token = req.arg("nextToken") or ""
    records: list[SandboxRecord] = []
    while True:
        page, token = await manager.list(
            req.team,
            states=states,
            metadata=metadata,
            page_size=limit or MAX_LIST_LIMIT,
            page_token=token,
            newest_first=newest_first,
            created_after=started_after,
            template=template,
        )
        records += page
        if limit or not token:
            break
    rows = store.e2b_sandboxes([r.id for r in records])
    headers = {"x-next-token": token} if token else {}
    return RestResponse(200, [listed(r, rows.get(r.id)) for r in records], headers)


def _metadata_query(text: str) -> dict[str, str]:
    """E2B's metadata filter: `urlencode({quote(k): quote(v)})` in one parameter, so each
    key and value is decoded twice."""
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        raise E2bError(400, f"metadata {text!r}: use key=value pairs joined by &") from None
    return {unquote(key): unquote(value) for key, value in pairs}


async def kill(services: Services, req: RestRequest) -> RestResponse:
    manager, _ = _manager(services)
    record = await _live(services, req.team, req.params["sandboxID"])
    try:
        await manager.kill(req.team, record.id)
    except SandboxNotRunning:  # it ended meanwhile
        raise _not_found(record.id) from None
    return RestResponse(204)


async def set_timeout(services: Services, req: RestRequest) -> RestResponse:
    manager, _ = _manager(services)
    body = req.json_object()
    if "timeout" not in body:
        raise E2bError(400, 'the body must name the new timeout in seconds: {"timeout": 60}')
    seconds = _seconds(body, "timeout", DEFAULT_TIMEOUT, zero_ok=True)
    record = await _live(services, req.team, req.params["sandboxID"])
    await manager.set_timeout(req.team, record.id, seconds, zero_ok=True)
    return RestResponse(204)


async def pause(services: Services, req: RestRequest) -> RestResponse:
    manager, _ = _manager(services)
    keep_memory = _bool(req.json_object(), "memory", True)  # false: pause to disk
    record = await _live(services, req.team, req.params["sandboxID"])
    already = E2bError(409, f"sandbox {record.id} is paused already")
    if record.state == "paused":
        raise already
    try:
        await manager.pause(req.team, record.id, keep_memory=keep_memory)
    except InvalidRequest:  # paused by another request meanwhile
        raise already from None
    return RestResponse(204)


async def connect(services: Services, req: RestRequest) -> RestResponse:
    """Resume a paused sandbox (201) or extend a running one's deadline (200): its
    deadline becomes now + timeout if that is later, else stays exactly as it was."""
    seconds = _seconds(req.json_object(), "timeout", DEFAULT_TIMEOUT)
    return await _wake(services, req, seconds, resume_only=False)


async def resume(services: Services, req: RestRequest) -> RestResponse:
    """The deprecated resume: 409 for a running sandbox."""
    seconds = _seconds(req.json_object(), "timeout", DEFAULT_TIMEOUT)
    return await _wake(services, req, seconds, resume_only=True)


async def _wake(
    services: Services, req: RestRequest, seconds: int, *, resume_only: bool
) -> RestResponse:
    manager, _ = _manager(services)
    record = await _live(services, req.team, req.params["sandboxID"])
    if record.state == "paused":
        # The deadline first: a paused sandbox past it must not be ended as it wakes.
        await manager.set_timeout(req.team, record.id, seconds)
        try:
            record = await manager.resume(req.team, record.id)
            return RestResponse(201, sandbox_body(record, _row(services, record.id)))
        except InvalidRequest:  # another request resumed it meanwhile: it runs
            record = await _live(services, req.team, record.id)
    if resume_only:
        raise E2bError(409, f"sandbox {record.id} is running already; connect to it instead")
    record = await _extend(manager, req.team, record, seconds)
    return RestResponse(200, sandbox_body(record, _row(services, record.id)))


async def _extend(
    manager: SandboxManager, team: Team, record: SandboxRecord, seconds: int
) -> SandboxRecord:
    """The deadline moved to now + seconds if that is later; untouched otherwise."""
    if time.time() + seconds > record.expires_at.timestamp():
        return await manager.set_timeout(team, record.id, seconds)
    return record


async def refresh(services: Services, req: RestRequest) -> RestResponse:
    manager, _ = _manager(services)
    body = req.json_object()
    seconds = _seconds(body, "duration", REFRESH_SECONDS, zero_ok=True)
    record = await _live(services, req.team, req.params["sandboxID"])
    if seconds:
        await _extend(manager, req.team, record, seconds)
    return RestResponse(204)


ROUTES: list[Route] = [
    Route("POST", "/sandboxes", create),
    Route("POST", "/v2/sandboxes", create),
    Route("GET", "/sandboxes", list_v1),
    Route("GET", "/v2/sandboxes", list_v2),
    Route("GET", "/sandboxes/{sandboxID}", get),
    Route("DELETE", "/sandboxes/{sandboxID}", kill),
    Route("POST", "/sandboxes/{sandboxID}/timeout", set_timeout),
    Route("POST", "/sandboxes/{sandboxID}/pause", pause),
    Route("POST", "/sandboxes/{sandboxID}/connect", connect),
    Route("POST", "/v2/sandboxes/{sandboxID}/connect", connect),
    Route("POST", "/sandboxes/{sandboxID}/resume", resume),
    Route("POST", "/sandboxes/{sandboxID}/refreshes", refresh),
]
