"""Which requests are E2B's: the envd daemon's (one per sandbox upstream, one URL here)
and the control plane's REST API. Corral's own API and port proxy paths never match.

    envd   header `E2b-Sandbox-Id`, or the host `49983-<id>.<ports domain>` (E2B's
           host form, for E2B_DOMAIN), or /process.Process/…, /filesystem.Filesystem/…,
           /files, /health, /envs
    REST   /sandboxes…, /v2/sandboxes…, /snapshots…, /templates…, /v2/templates…,
           /v3/templates…
"""

from __future__ import annotations

from typing import Any

from corral.server.ports import ENVD_PORT, parse_host

Scope = dict[str, Any]

SANDBOX_ID_HEADER = b"e2b-sandbox-id"
_ENVD_PREFIXES = ("/process.Process/", "/filesystem.Filesystem/")
_ENVD_PATHS = ("/files", "/health", "/envs")
_REST_ROOTS = (
    "sandboxes",
    "v2/sandboxes",
    "snapshots",
    "templates",
    "v2/templates",
    "v3/templates",
)


def header(scope: Scope, name: bytes) -> str | None:
    """The value of the request's header `name` (lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def sandbox_of(scope: Scope, domain: str) -> str | None:
    """The sandbox an envd request names: its `E2b-Sandbox-Id` header, else its host
    `49983-<id>.<domain>`; None when it names none."""
    named = header(scope, SANDBOX_ID_HEADER)
    if named is not None:
        return named.strip()
    by_host = parse_host(header(scope, b"host") or "", domain)
    if by_host is not None and by_host[0] == ENVD_PORT:
        return by_host[1]
    return None


def is_envd(scope: Scope, domain: str) -> bool:
    path: str = scope["path"]
    return (
        sandbox_of(scope, domain) is not None
        or path.startswith(_ENVD_PREFIXES)
        or path in _ENVD_PATHS
    )


def is_rest(scope: Scope) -> bool:
    path: str = scope["path"].strip("/")
    return any(path == root or path.startswith(root + "/") for root in _REST_ROOTS)
