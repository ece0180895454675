"""Every test is in exactly one tier, and `pytest -m <tier>` selects it.

The tiers are assigned in tests/conftest.py (`tier_of`); this runs pytest's collection once as
`make test-unit` and its siblings do, so a test that no tier selects cannot exist.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TIERS

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[1]


# One collection, as `make test` makes it, that prints each test's node id and the tier
# markers `pytest -m <tier>` would match it by (`item.iter_markers`: its own, its class's
# and its module's, the same markers `-m` looks at).
_REPORT = """
import sys, pytest
TIERS = set(sys.argv[1:])
class Report:
    def pytest_collection_finish(self, session):
        for item in session.items:
            names = sorted({m.name for m in item.iter_markers()} & TIERS)
            print("TIERS", *names, item.nodeid, sep="\\t")
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[Report()]))
"""


def tiers_by_test() -> dict[str, list[str]]:
    """Each collected test's node id and the tiers it is marked with."""
    done = subprocess.run(
        [sys.executable, "-c", _REPORT, *TIERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("\t")[1:] for line in done.stdout.splitlines() if line.startswith("TIERS\t")]
    return {row[-1]: row[:-1] for row in rows}


def test_every_test_is_in_exactly_one_tier() -> None:
    tiers = tiers_by_test()
    assert len(tiers) > 1000, "the collection found too few tests"
    assert {node: found for node, found in tiers.items() if len(found) != 1} == {}
    # Each rule of tier_of at work: no fixture, a server fixture, a module's marker.
    unit = [node for node, found in tiers.items() if found == ["unit"]]
    assert "tests/test_job_spec.py::test_a_command_job" in unit
    assert not any(node.startswith(("tests/test_api.py", "tests/test_cli.py")) for node in unit)
