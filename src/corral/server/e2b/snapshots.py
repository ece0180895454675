"""E2B snapshots and forks, on Corral's snapshot templates.

An E2B snapshot is a template of the team's made from a live sandbox's `/`
(`TemplateCatalog.snapshot`): its `snapshotID` is the template's name, so creating a
sandbox with `templateID=<snapshotID>` boots it like any template, each sandbox on its
own writable layer (siblings never see each other's writes), and `DELETE
/templates/{snapshotID}` removes it. Only the filesystem is kept: processes are not
(Corral has no memory snapshots of a namespace sandbox).

A fork is a snapshot that lives only while its forks start: the source is snapshotted
once, `count` sandboxes are created from it, then the template is forgotten (the forks
keep its layers: each sandbox holds the layers it was started from).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, InvalidRequest, ServerUnavailable
from corral.server.e2b.errors import E2bError, rest_status
from corral.server.e2b.network import network_body
from corral.server.e2b.rest import Handler, RestRequest, RestResponse, Route
from corral.server.e2b.templates import catalog_of, corral_name
from corral.templates import base as server_base

if TYPE_CHECKING:
    from corral.server.base import Services
    from corral.store.templates import TemplateRow

MAX_FORKS = 16
MAX_PAGE = 1000


def _text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string, got {value!r}")
    return value


def _count(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{key}={value!r} must be a whole number from {low} to {high}")
    return value


def _unnamed(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


async def create_snapshot(services: Services, req: RestRequest) -> RestResponse:
    """`POST /sandboxes/{sandboxID}/snapshots {name?}` → 201 `{snapshotID, names}`."""
    catalog = catalog_of(services)
    asked = _text(req.json_object(), "name")
    name = corral_name(asked) if asked else _unnamed("snapshot")
    # A name moves to the newest snapshot, as E2B's do; it never replaces a template.
    rows = catalog.store.template_rows(req.team.id, name)
    if (rows and rows[0].source != "snapshot") or name == server_base.NAME:
        raise E2bError(
            409, f"{name!r} names a template, not a snapshot: give the snapshot another name"
        )
    await catalog.snapshot(req.team.id, req.params["sandboxID"], name)
    return RestResponse(201, {"snapshotID": name, "names": [name]})


def snapshot_rows(services: Services, team_id: str) -> list[TemplateRow]:
    """The team's ready snapshot templates, newest first, one per name."""
    if services.store is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    seen: set[str] = set()
    rows = []
    for row in services.store.template_rows(team_id):  # newest first
        if row.name in seen:
            continue
        seen.add(row.name)
        if row.source == "snapshot" and row.state == "ready":
            rows.append(row)
    return rows


async def list_snapshots(services: Services, req: RestRequest) -> RestResponse:
    """`GET /snapshots?sandboxID=&name=&limit=&nextToken=`: newest first; the next
    page's token in the header `x-next-token` (none on the last page)."""
    sandbox_id = req.arg("sandboxID") or None
    asked = req.arg("name")
    name = corral_name(asked) if asked else None
    limit = _query_int(req.arg("limit"), "limit", 100, 1, MAX_PAGE)
    offset = _query_int(req.arg("nextToken"), "nextToken", 0, 0, 1 << 31)
    rows = [
        row
        for row in snapshot_rows(services, req.team.id)
        if (name is None or row.name == name)
        and (sandbox_id is None or row.request.get("sandbox_id") == sandbox_id)
    ]
    page = rows[offset : offset + limit]
    headers = {"x-next-token": str(offset + limit)} if offset + limit < len(rows) else {}
    body = [{"snapshotID": row.name, "names": [row.name]} for row in page]
    return RestResponse(200, body, headers)


def _query_int(raw: str | None, key: str, default: int, low: int, high: int) -> int:
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        what = "the x-next-token of the previous page" if key == "nextToken" else "a number"
        raise InvalidRequest(f"{key}={raw!r} is invalid: give {what} from {low} to {high}")
    return int(raw)


async def fork(services: Services, req: RestRequest) -> RestResponse:
    """`POST /sandboxes/{sandboxID}/fork {timeout, count}` → 201, one entry per fork:
    `{"sandbox": <create body>}` or `{"error": {code, message}}`. The source keeps
    running; a source that is not live is 404 (nothing forked). Each fork is created
    like the source was (metadata, env vars, secure, network), from its snapshot."""
    catalog = catalog_of(services)
    store, manager = services.store, services.manager
    if store is None or manager is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    body = req.json_object()
    count = _count(body, "count", 1, 1, MAX_FORKS)
    timeout = _count(body, "timeout", 300, 1, 24 * 3600)
    source_id = req.params["sandboxID"]
    source = await manager.get(req.team, source_id)  # another team's: 404
    name = _unnamed("fork")
    await catalog.snapshot(req.team.id, source_id, name)  # not live: 404
    e2b = store.e2b_sandbox(source_id)
    create = {
        "templateID": name,
        "timeout": timeout,
        "metadata": dict(source.metadata),
        "envVars": dict(e2b.envs) if e2b else {},
        "secure": bool(e2b.envd_access_token) if e2b else True,
        "autoPause": e2b.auto_pause if e2b else False,
        **network_body(source.network, source.public_ports),
    }
    created = _create_route()
    results: list[dict[str, Any]] = []
    try:
        for _ in range(count):
            one = RestRequest(req.team, "POST", {}, [], dict(create), {})
            try:
                made = await created(services, one)
            except CorralError as exc:
                results.append({"error": {"code": rest_status(exc), "message": str(exc)}})
            else:
                results.append({"sandbox": made.body})
    finally:
        # The forks hold the layers they started from; the template itself goes.
        catalog.drop(store.delete_templates(req.team.id, name))
    return RestResponse(201, results)


def _create_route() -> Handler:
    """The handler of `POST /sandboxes` (lifecycle's): a fork is created as any sandbox."""
    from corral.server.e2b import lifecycle

    for route in lifecycle.ROUTES:
        if route.method == "POST" and route.pattern == "/sandboxes":
            return route.handler
    raise ServerUnavailable("this server creates no E2B sandboxes (no POST /sandboxes)")


ROUTES = [
    Route("POST", "/sandboxes/{sandboxID}/snapshots", create_snapshot),
    Route("GET", "/snapshots", list_snapshots),
    Route("POST", "/sandboxes/{sandboxID}/fork", fork),
]
