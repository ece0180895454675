"""The CLI starts fast because each command imports only what it uses.

Timing lives in `benchmarks/cli.py`; this test pins down the cause instead: the modules a
command loads, read from `python -X importtime` of a real `corral` process. What costs
tens of milliseconds each on a small machine (an event loop, the streaming RPC stack and
its HTTP client, protobuf, YAML, the engine, the store) must not be loaded by commands
that do not need it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.acceptance

# Loaded by nothing that only prints help, the version, or a list of sandboxes.
HEAVY = (
    "asyncio",
    "connectrpc",
    "pyqwest",
    "opentelemetry",
    "httpx",
    "yaml",
    "sqlalchemy",
    "importlib.metadata",
    "corral.isolation",
    "corral.jobs",
    "corral.store",
    "corral.server",
)


def loaded_modules(*args: str, env: dict[str, str] | None = None) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def heavy(modules: set[str], *allowed: str) -> list[str]:
    return sorted(
        name
        for name in modules
        for prefix in HEAVY
        if prefix not in allowed and (name == prefix or name.startswith(prefix + "."))
    )


def test_help_loads_no_sdk_and_no_protobuf() -> None:
    for args in [("--help",), ("sandbox", "--help"), ("job", "submit", "--help")]:
        modules = loaded_modules(*args)
        assert heavy(modules) == [], args
        assert not any(m.startswith(("google.protobuf", "corral.client")) for m in modules), args


def test_version_reads_the_package_metadata_only_then() -> None:
    assert "importlib.metadata" in loaded_modules("--version")


def test_sandbox_list_sends_one_call_without_the_streaming_stack(server: LiveServer) -> None:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_API_KEY": server.key}
    modules = loaded_modules("sandbox", "list", env=env)
    assert heavy(modules) == []
    assert "corral.v1.sandbox_pb2" in modules  # it did make the call
