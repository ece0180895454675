"""The `corral` command as a subprocess, the way users run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from corral.config import Settings
from tests.conftest import require_backend


def corral(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CORRAL_RUNTIME_DIR": str(settings.runtime_dir),
        "CORRAL_CGROUP_PARENT": settings.cgroup_parent,
    }
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.sandbox
def test_run_streams_output_and_passes_the_exit_code(settings: Settings) -> None:
    require_backend(settings, "namespace")
    done = corral(settings, "run", "-e", "WHO=world", "--", "sh", "-c", "echo hello $WHO; exit 7")
    assert done.stdout == "hello world\n"
    assert done.returncode == 7


@pytest.mark.sandbox
def test_run_reports_a_timeout(settings: Settings) -> None:
    require_backend(settings, "namespace")
    done = corral(settings, "run", "--timeout", "0.3", "--", "sleep", "10")
    assert done.returncode == 137
    assert "timeout" in done.stderr


def test_bad_input_gets_one_clear_line_and_exit_2(settings: Settings) -> None:
    done = corral(settings, "run", "--template", "nope", "--", "true")
    assert done.returncode == 2
    assert "unknown template 'nope'" in done.stderr
    done = corral(settings, "run", "-e", "NOEQUALS", "--", "true")
    assert done.returncode == 2 and "KEY=VALUE" in done.stderr


def test_doctor_lists_the_tiers(settings: Settings) -> None:
    done = corral(settings, "doctor")
    assert done.returncode == 0
    assert "namespace" in done.stdout and "process" in done.stdout
