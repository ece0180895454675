"""Which requests are E2B's: the envd daemon's (one per sandbox upstream, one URL here)
and the control plane's REST API. Corral's own API and port proxy paths never match.

    envd   header `E2b-Sandbox-Id`, or /process.Process/…, /filesystem.Filesystem/…,
           /files, /health, /envs
    REST   /sandboxes…, /v2/sandboxes…, /snapshots…, /templates…, /v2/templates…,
           /v3/templates…
"""

from __future__ import annotations

from typing import Any

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


def is_envd(scope: Scope) -> bool:
    path: str = scope["path"]
    return (
        header(scope, SANDBOX_ID_HEADER) is not None
        or path.startswith(_ENVD_PREFIXES)
        or path in _ENVD_PATHS
    )


def is_rest(scope: Scope) -> bool:
    path: str = scope["path"].strip("/")
    return any(path == root or path.startswith(root + "/") for root in _REST_ROOTS)
