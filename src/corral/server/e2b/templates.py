"""E2B's template routes on Corral's template catalog: aliases, listing, deletion and the
builds of E2B's `Template` builder.

An E2B template id, alias and name are all the Corral template's name (a `team/` prefix
and a `:tag` suffix, which E2B's names may carry, are dropped). The builder's calls map
onto one Corral build:

    POST /v3/templates {name}                       → {templateID: name, buildID}
    GET  /templates/{name}/files/{hash}             → {present, url}: COPY files upload
    PUT  <url> (a tar of the step's files)          → kept under the hash until the build
    POST /v2/templates/{name}/builds/{buildID} {fromTemplate|fromImage, steps, …}
                                                    → the catalog's build (a job)
    GET  /templates/{name}/builds/{buildID}/status?logsOffset=
                                                    → {status, logEntries, reason}

A build's status and logs are those of the name's newest build (the catalog keeps one
row per build of a name; E2B's buildID is not kept apart from it).
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError, InvalidBuild, InvalidRequest, ServerUnavailable
from corral.images import BuildPlan, parse_e2b_template
from corral.network.policy import NetworkPolicy
from corral.server.e2b import uploads
from corral.server.e2b.rest import RestRequest, RestResponse, Route
from corral.server.e2b.sandboxes import ENVD_VERSION
from corral.server.templates import check_registry, unpack_context
from corral.templates.catalog import check_name
from corral.templates.defaults import SandboxDefaults

if TYPE_CHECKING:
    from corral.server.base import Services
    from corral.store.templates import TemplateRow
    from corral.templates import TemplateCatalog

_STATUS = {"building": "building", "ready": "ready", "failed": "error", "cancelled": "error"}
MAX_LOG_ENTRIES = 100


def catalog_of(services: Services) -> TemplateCatalog:
    if services.templates is None or services.store is None:
        raise ServerUnavailable("the Corral server is starting or stopping; try again")
    return services.templates


def corral_name(ref: str) -> str:
    """The Corral template name of an E2B template reference (`team/name:tag` → `name`)."""
    if not isinstance(ref, str):
        raise InvalidRequest(f"a template name is a string, got {ref!r}")
    return ref.rpartition("/")[2].partition(":")[0]


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- aliases, listing, deletion ------------------------------------------------------------


async def get_alias(services: Services, req: RestRequest) -> RestResponse:
    """`GET /templates/aliases/{alias}` → `{templateID, public}`; 404 when the team can
    start no sandbox of that name (`base` and `host` are everyone's: public)."""
    catalog = catalog_of(services)
    name = corral_name(req.params["alias"])
    catalog.resolve(req.team.id, name)  # TemplateNotFound: 404
    assert services.store is not None
    public = not services.store.template_rows(req.team.id, name)
    return RestResponse(200, {"templateID": name, "public": public})


def _template_body(row: TemplateRow) -> dict[str, Any]:
    limits = SandboxDefaults.from_json(row.sandbox_limits, row.sandbox_network).limits_for({})
    return {
        "templateID": row.name,
        "buildID": row.id,
        "cpuCount": max(1, round(limits.cpu)),
        "memoryMB": limits.memory_mib,
        "diskSizeMB": limits.disk_mib,
        "public": False,
        "aliases": [row.name],
        "names": [row.name],
        "createdAt": _iso(row.created_at),
        "updatedAt": _iso(row.updated_at),
        "createdBy": None,
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": 1,
        "envdVersion": ENVD_VERSION,
        "buildStatus": _STATUS.get(row.state, "error"),
    }


async def list_templates(services: Services, req: RestRequest) -> RestResponse:
    """`GET /templates`: the team's templates (the newest build of each name)."""
    catalog_of(services)
    assert services.store is not None
    newest: dict[str, TemplateRow] = {}
    for row in services.store.template_rows(req.team.id):
        newest.setdefault(row.name, row)
    return RestResponse(200, [_template_body(newest[name]) for name in sorted(newest)])


async def delete_template(services: Services, req: RestRequest) -> RestResponse:
    """`DELETE /templates/{templateID}` (a template or a snapshot) → 204; 404 when the
    team has none of that name; 409 while live sandboxes use it."""
    await catalog_of(services).delete(req.team.id, corral_name(req.params["templateID"]))
    return RestResponse(204)


# -- builds ---------------------------------------------------------------------------------


async def request_build(services: Services, req: RestRequest) -> RestResponse:
    """`POST /v3/templates {name, tags?, cpuCount?, memoryMB?}` → 202 with the ids the
    builder's next calls use. Nothing is made until the build is started."""
    catalog_of(services)
    body = req.json_object()
    asked = body.get("name") or body.get("alias")
    if not isinstance(asked, str) or not asked:
        raise InvalidRequest('name the template: {"name": "my-template"}')
    name = corral_name(asked)
    check_name(name)
    build_id = secrets.token_hex(8)
    return RestResponse(
        202,
        {
            "templateID": name,
            "buildID": build_id,
            "public": False,
            "names": [name],
            "aliases": [name],
            "tags": [],
        },
    )


def _defaults(body: dict[str, Any]) -> SandboxDefaults:
    limits: dict[str, int | float] = {}
    for key, field in (("cpuCount", "cpu"), ("memoryMB", "memory_mib")):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequest(f"{key}={value!r} must be a whole number")
            limits[field] = value
    return SandboxDefaults(limits)


async def start_build(services: Services, req: RestRequest) -> RestResponse:
    """`POST /v2/templates/{templateID}/builds/{buildID}` with the builder's template
    (`TemplateBase.to_json`) → 202; the build runs as a job of the queue."""
    from corral.templates import BuildRequest

    catalog = catalog_of(services)
    name = corral_name(req.params["templateID"])
    check_name(name)
    body = req.json_object()
    if body.get("fromImageRegistry") and not body.get("fromImage"):
        raise InvalidRequest("fromImageRegistry goes with fromImage")
    steps = body.get("steps") or []
    if not isinstance(steps, list):
        raise InvalidBuild("E2B template: steps is a list")
    hashes = uploads.copy_hashes(steps)
    context = await asyncio.to_thread(uploads.build_context, services, req.team.id, hashes)
    plan = await asyncio.to_thread(_plan, body, context)
    await check_registry(catalog, req.team.id, plan.base)
    team_name = catalog.store.team_by_id(req.team.id).name
    internet = NetworkPolicy.parse("internet")
    try:  # E2B's builds reach the internet (pip_install, apt_install): when allowed
        catalog.settings.network_cap().check(internet, team_name)
        network = internet
    except CorralError:
        network = NetworkPolicy()
    request = BuildRequest(
        name=name,
        plan=plan,
        source="e2b",
        context=context,
        network=network,
        defaults=_defaults(body),
    )
    await catalog.build(req.team.id, request)
    uploads.forget(services, req.team.id, hashes)
    return RestResponse(202)


def _plan(body: dict[str, Any], context: bytes | None) -> BuildPlan:
    """The build plan of a builder template, its COPY sources checked in `context`."""
    if context is None:
        return parse_e2b_template(body)
    with tempfile.TemporaryDirectory(prefix="corral-context-") as scratch:
        return parse_e2b_template(body, unpack_context(context, Path(scratch)))


def _newest(services: Services, team_id: str, name: str) -> TemplateRow:
    from corral.errors import TemplateNotFound

    assert services.store is not None
    rows = services.store.template_rows(team_id, name)
    if not rows:
        raise TemplateNotFound(f"your team has no template {name!r} (no build of it)")
    return rows[0]


async def build_status(services: Services, req: RestRequest) -> RestResponse:
    """`GET /templates/{templateID}/builds/{buildID}/status?logsOffset=N`: the build's
    state and its log lines from the N-th (at most 100 a call), and why it failed."""
    catalog = catalog_of(services)
    name = corral_name(req.params["templateID"])
    raw = req.arg("logsOffset") or "0"
    if not raw.isdigit():
        raise InvalidRequest(f"logsOffset={raw!r} must be a whole number, 0 or more")
    row = _newest(services, req.team.id, name)
    record = await catalog.get(req.team.id, name)  # settles a build whose job was lost
    state = record.state
    entries: list[dict[str, Any]] = []
    if row.build_job_id is not None:
        store = catalog.store
        chunks = await asyncio.to_thread(
            store.job_logs, row.build_job_id, int(raw), MAX_LOG_ENTRIES
        )
        for chunk in chunks:
            entries.append(
                {
                    "timestamp": _iso(chunk.at),
                    "level": "error" if chunk.stream == 2 else "info",
                    "message": chunk.data.decode("utf-8", "replace"),
                    "step": str(chunk.step),
                }
            )
    body: dict[str, Any] = {
        "templateID": name,
        "buildID": req.params["buildID"],
        "status": _STATUS.get(state, "error"),
        "logs": [entry["message"] for entry in entries],
        "logEntries": entries,
    }
    if body["status"] == "error":
        body["reason"] = {"message": record.error or f"the build was {state}"}
    return RestResponse(200, body)


ROUTES = [
    Route("GET", "/templates/aliases/{alias}", get_alias),
    Route("GET", "/templates", list_templates),
    Route("DELETE", "/templates/{templateID}", delete_template),
    Route("POST", "/v3/templates", request_build),
    Route("GET", "/templates/{templateID}/files/{hash}", uploads.upload_link),
    Route("POST", "/v2/templates/{templateID}/builds/{buildID}", start_build),
    Route("GET", "/templates/{templateID}/builds/{buildID}/status", build_status),
]
