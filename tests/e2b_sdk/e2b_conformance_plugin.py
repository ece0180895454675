"""E2B's own SDK suite against Corral: which of its tests count, in which area, and a
pytest plugin that records how each one ended.

scripts/e2b_conformance.py loads this module into a run of a checkout's
`packages/python-sdk/tests` (`-p e2b_conformance_plugin`) and reads back the results; it
imports the tables below to report them. The areas are those of
shared/reference/e2b-sdk-tests.md section 3 and the cloud-only tests those of its section 5.
Standard library only: it runs in the E2B environment and in the script's interpreter.

The plugin is driven by environment variables (set by the script):
- CORRAL_CONFORMANCE_RESULTS: where to write `{nodeid: {"outcome", "reason", "seconds"}}`;
- CORRAL_CONFORMANCE_SKIP: a JSON file of node ids not to run (known offline tests);
- CORRAL_CONFORMANCE_AREAS: a comma list of areas to run (all when empty).
Cloud-only tests are always deselected.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

SIDES = ("sync", "async")

# Tests that need E2B's cloud: no self-hosted server can pass them (section 5). "{s}" is
# the side: the same tests exist under tests/sync and tests/async.
_PUBLIC_HOST = "a per-port public host https://<port>-<id>.<domain> (wildcard DNS + TLS)"
_EGRESS = "sandbox egress to the public internet (1.1.1.1, 8.8.8.8, gstatic.com)"
_REGISTRY = "a template build from a registry image (ubuntu:22.04, E2B's base image)"
_CLOUD_ONLY_TEMPLATE: dict[str, str] = {
    "tests/{s}/sandbox_{s}/test_host.py::test_ping_server": _PUBLIC_HOST,
    "tests/{s}/sandbox_{s}/test_create.py::test_auto_resume_wakes_on_http_request": _PUBLIC_HOST,
    "tests/{s}/sandbox_{s}/test_network.py::test_allow_public_traffic_false": _PUBLIC_HOST,
    "tests/{s}/sandbox_{s}/test_network.py::test_allow_public_traffic_true": _PUBLIC_HOST,
    "tests/{s}/sandbox_{s}/test_network.py::test_mask_request_host": _PUBLIC_HOST,
    "tests/{s}/sandbox_{s}/test_internet_access.py::test_internet_access_enabled": _EGRESS,
    "tests/{s}/sandbox_{s}/test_internet_access.py::test_internet_access_default": _EGRESS,
    "tests/{s}/sandbox_{s}/test_network.py::test_allow_specific_ip_with_deny_all": _EGRESS,
    "tests/{s}/sandbox_{s}/test_network.py::test_deny_specific_ip": _EGRESS,
    "tests/{s}/sandbox_{s}/test_network.py::test_allow_takes_precedence_over_deny": _EGRESS,
    "tests/{s}/sandbox_{s}/test_network.py::test_update_network_applies_restrictions": _EGRESS,
    "tests/{s}/sandbox_{s}/test_network.py::test_update_network_clears_existing_rules": _EGRESS,
    "tests/{s}/sandbox_{s}/test_network.py::test_firewall_transform_injects_headers": (
        "E2B's cloud `httpbin` template, public host routing and its egress proxy"
    ),
    "tests/{s}/template_{s}/test_build.py::test_build_template": _REGISTRY,
    "tests/{s}/template_{s}/test_build.py::test_build_template_with_symlinks": _REGISTRY,
    "tests/{s}/template_{s}/test_build.py::test_build_template_with_resolve_symlinks": _REGISTRY,
    "tests/{s}/template_{s}/methods/test_make_symlink.py": _REGISTRY,
    "tests/{s}/template_{s}/methods/test_run_cmd.py": _REGISTRY,
    "tests/{s}/template_{s}/test_background_build.py": _REGISTRY,
    "tests/{s}/template_{s}/test_tags.py::TestTagsIntegration": _REGISTRY,
}
CLOUD_ONLY: dict[str, str] = {
    pattern.format(s=side): reason
    for pattern, reason in _CLOUD_ONLY_TEMPLATE.items()
    for side in SIDES
} | {"tests/async/template_async/test_build.py::test_build_template_with_skip_cache": _REGISTRY}

# (area, substrings of a test's path, any of which puts it there): the first match wins,
# so narrower entries come first.
AREAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("git", ("/git/",)),
    ("fs-watch", ("/files/test_watch.py",)),
    ("fs-signed-url", ("/files/test_secured.py",)),
    ("filesystem", ("/files/",)),
    ("commands", ("/commands/",)),
    ("pty", ("/pty/",)),
    ("list", ("/test_sbx_list.py",)),
    ("snapshots", ("/test_snapshot_api.py",)),
    (
        "pause-resume",
        ("/test_sbx_snapshot.py", "/test_snapshot.py", "/test_snapshot_filesystem_only.py"),
    ),
    ("fork", ("/test_fork.py",)),
    ("timeout", ("/test_timeout.py",)),
    ("metrics", ("/test_metrics.py",)),
    (
        "network",
        (
            "/test_internet_access.py",
            "/test_network.py",
            "/test_egress_proxy.py",
            "/test_network_transform.py",
        ),
    ),
    ("host-routing", ("/test_host.py",)),
    ("templates", ("/template_sync/", "/template_async/", "/shared/template/")),
    ("secrets", ("/secret_sync/", "/secret_async/")),
    ("volumes", ("/volume_sync/", "/volume_async/")),
    (
        "sdk-unit",
        (
            "/test_config_propagation.py",
            "/test_lifecycle_request.py",
            "/shared/api/",
            "/test_sync_client_lifecycle.py",
        ),
    ),
    (
        "lifecycle",
        (
            "/test_create.py",
            "/test_connect.py",
            "/test_kill.py",
            "/test_sbx_info.py",
            "/test_sbx_kill.py",
            "/test_secure.py",
        ),
    ),
)
AREA_NAMES = tuple(name for name, _ in AREAS)


def area_of(nodeid: str) -> str:
    path = "/" + nodeid.split("::", 1)[0]
    return next((name for name, parts in AREAS if any(p in path for p in parts)), "other")


def side_of(nodeid: str) -> str:
    return "async" if nodeid.startswith("tests/async/") else "sync"


def cloud_only(nodeid: str) -> str | None:
    """Why `nodeid` needs E2B's cloud, or None."""
    for entry, reason in CLOUD_ONLY.items():
        if nodeid == entry or nodeid.startswith((entry + "::", entry + "[")):
            return reason
    return None


# -- the plugin --------------------------------------------------------------------------

_results: dict[str, dict[str, Any]] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_file = os.environ.get("CORRAL_CONFORMANCE_SKIP")
    skip = set(json.loads(Path(skip_file).read_text())) if skip_file else set()
    areas = {a for a in os.environ.get("CORRAL_CONFORMANCE_AREAS", "").split(",") if a}
    kept, dropped = [], []
    for item in items:
        if (
            item.nodeid in skip
            or cloud_only(item.nodeid)
            or (areas and area_of(item.nodeid) not in areas)
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A test passed when none of its phases failed and its call ran; the first failing
    or skipping phase gives its one-line reason."""
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "reason": "", "seconds": 0.0})
    entry["seconds"] = round(entry["seconds"] + report.duration, 3)
    if entry["outcome"] != "passed" or report.passed:
        return
    entry["outcome"] = "skipped" if report.skipped else "failed"
    if report.failed and report.when != "call":
        entry["outcome"] = "error"
    entry["reason"] = _reason(report)


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = str(longrepr[2])
    elif (crash := getattr(longrepr, "reprcrash", None)) is not None:
        text = str(crash.message)
    else:
        text = str(longrepr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return (f"[{report.when}] " if report.when != "call" else "") + line[:300]


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get("CORRAL_CONFORMANCE_RESULTS")
    if target and not hasattr(session.config, "workerinput"):  # xdist's controller only
        Path(target).write_text(json.dumps({"finished": time.time(), "tests": _results}))
