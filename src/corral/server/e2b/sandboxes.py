"""E2B's view of a sandbox: its row beside Corral's (`corral.store.e2b`) and the JSON
bodies E2B's API returns for it (Sandbox, ListedSandbox, SandboxDetail).

A sandbox created through Corral's own API has no E2B row: it shows with the template
as its alias and no envd token (its envd routes need the team's API key).
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING, Any

from corral.store.e2b import E2bSandboxRow

if TYPE_CHECKING:
    from datetime import datetime

    from corral.sandboxes import SandboxRecord

# The envd version the SDK is told: it gates features by it (0.4.0 default user, 0.5.2
# CloseStdin, 0.5.7 octet-stream uploads, 0.6.2 file metadata, 0.6.3 entries in watch
# events, 0.6.4 watching network mounts); this server's envd has them all.
ENVD_VERSION = "0.6.4"
# E2B's states; Corral's "creating" shows as running (create returns once it runs).
_STATES = {"creating": "running", "running": "running", "paused": "paused"}


def new_row(
    sandbox_id: str, *, secure: bool, alias: str, auto_pause: bool, envs: dict[str, str]
) -> E2bSandboxRow:
    """The E2B row of a sandbox being created: a fresh envd access token when secure."""
    return E2bSandboxRow(
        sandbox_id=sandbox_id,
        envd_access_token=secrets.token_hex(24) if secure else "",
        client_id=secrets.token_hex(4),
        alias=alias,
        auto_pause=auto_pause,
        envs=dict(envs),
    )


def _time(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def _client_id(row: E2bSandboxRow | None) -> str:
    return row.client_id if row is not None else "corral"


def sandbox_body(record: SandboxRecord, row: E2bSandboxRow | None) -> dict[str, Any]:
    """What create and connect return (E2B's `Sandbox`)."""
    body: dict[str, Any] = {
        "templateID": record.template,
        "sandboxID": record.id,
        "clientID": _client_id(row),
        "envdVersion": ENVD_VERSION,
        "alias": row.alias if row is not None else record.template,
        "domain": None,
    }
    if row is not None and row.envd_access_token:
        body["envdAccessToken"] = row.envd_access_token
    if record.traffic_token:
        body["trafficAccessToken"] = record.traffic_token
    return body


def listed(record: SandboxRecord, row: E2bSandboxRow | None) -> dict[str, Any]:
    """One entry of a list (E2B's `ListedSandbox`)."""
    body: dict[str, Any] = {
        "templateID": record.template,
        "alias": row.alias if row is not None else record.template,
        "sandboxID": record.id,
        "clientID": _client_id(row),
        "startedAt": _time(record.created_at),
        "endAt": _time(record.expires_at),
        "cpuCount": max(1, math.ceil(record.limits.cpu)),
        "memoryMB": record.limits.memory_mib,
        "diskSizeMB": record.limits.disk_mib,
        "state": _STATES.get(record.state, record.state),
        "envdVersion": ENVD_VERSION,
        "metadata": dict(record.metadata),
    }
    if record.volumes:
        body["volumeMounts"] = [{"name": v.name, "path": v.path} for v in record.volumes]
    return body


def detail(record: SandboxRecord, row: E2bSandboxRow | None) -> dict[str, Any]:
    """One sandbox's info (E2B's `SandboxDetail`)."""
    body = listed(record, row)
    body["domain"] = None
    if row is not None and row.envd_access_token:
        body["envdAccessToken"] = row.envd_access_token
    auto_pause = row is not None and row.auto_pause
    body["lifecycle"] = {"autoResume": False, "onTimeout": "pause" if auto_pause else "kill"}
    return body
