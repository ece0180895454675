"""Every test is in exactly one tier, and `pytest -m <tier>` selects it.

The tiers are assigned in tests/conftest.py (`tier_of`); this runs pytest's collection as
`make test-unit` and its siblings do, so a test that no tier selects cannot exist.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TIERS

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[1]


def collected(*args: str) -> list[str]:
    """The node ids `pytest --collect-only` selects with `args`."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 5), done.stdout + done.stderr  # 5: nothing selected
    return [line for line in done.stdout.splitlines() if re.match(r"tests/\S+::", line)]


def test_every_test_is_in_exactly_one_tier() -> None:
    assert collected("-m", " and ".join(f"not {tier}" for tier in TIERS)) == []
    pairs = [f"({a} and {b})" for i, a in enumerate(TIERS) for b in TIERS[i + 1 :]]
    assert collected("-m", " or ".join(pairs)) == []
    # Each rule of tier_of at work: no fixture, a server fixture, a module's marker.
    unit = collected("-m", "unit")
    assert "tests/test_job_spec.py::test_a_command_job" in unit
    assert not any(node.startswith(("tests/test_api.py", "tests/test_cli.py")) for node in unit)
