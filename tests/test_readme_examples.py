"""The README's examples, taken from README.md and run as written against a real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.limits import MIB, Limits
from tests.conftest import LiveServer

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("sandbox_host")]

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(after: str, language: str) -> str:
    """The first ```language block of the README that follows the line `after`."""
    text = README.read_text()
    start = text.index(after)
    found = re.compile(rf"^```{language}\n(.*?)^```$", re.M | re.S).search(text, start)
    assert found is not None, f"no {language} block after {after!r} in README.md"
    return found.group(1)


def submit(server: LiveServer, spec: Path) -> tuple[int, dict[str, Any], str]:
    done = server.corral("job", "submit", "-f", str(spec), "--wait", "-o", "json")
    return done.returncode, json.loads(done.stdout) if done.stdout else {}, done.stderr


def job_ids(server: LiveServer) -> list[str]:
    listed = server.corral("job", "list", "-o", "json", "--limit", "0")
    assert listed.returncode == 0, listed.stderr
    return [job["id"] for job in json.loads(listed.stdout)]


def test_the_job_yaml_example_runs_as_written(server: LiveServer, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(readme_block("A spec, in YAML or JSON:", "yaml"))
    code, first, stderr = submit(server, spec)
    assert code == 0, stderr
    assert first["created"] and first["job"]["state"] == "succeeded"
    logs = server.corral("job", "logs", first["job"]["id"])
    assert logs.returncode == 0 and "hello" in logs.stdout

    # Its idempotency_key: the same file again is the same job, not a second one.
    code, again, stderr = submit(server, spec)
    assert code == 0, stderr
    assert not again["created"] and again["job"]["id"] == first["job"]["id"]


def test_an_idempotency_key_with_another_spec_is_refused(
    server: LiveServer, tmp_path: Path
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("idempotency_key: deploy-7\nrun: echo one\n")
    code, first, stderr = submit(server, spec)
    assert code == 0 and first["created"], stderr
    first_id = first["job"]["id"]

    before = job_ids(server)
    spec.write_text("idempotency_key: deploy-7\nrun: echo two\n")
    refused = server.corral("job", "submit", "-f", str(spec), "-o", "json")
    assert refused.returncode != 0 and refused.stdout == ""
    assert "deploy-7" in refused.stderr and first_id in refused.stderr
    assert "new key" in refused.stderr
    # The CLI option is the same key: refused the same way.
    inline = server.corral("job", "submit", "--idempotency-key", "deploy-7", "--", "true")
    assert inline.returncode != 0 and first_id in inline.stderr
    assert job_ids(server) == before  # nothing queued

    spec.write_text("idempotency_key: 7\nrun: echo one\n")
    bad = server.corral("job", "submit", "-f", str(spec))
    assert bad.returncode == 2 and "idempotency_key: must be a string" in bad.stderr


def test_the_readme_states_the_output_cap() -> None:
    """The cap on one command's output (a reason it can end with) is in the README."""
    text = " ".join(README.read_text().split())
    assert f"stderr together may be {Limits().output_bytes // MIB} MiB" in text


def test_the_sdk_example_prints_its_output_once(server: LiveServer) -> None:
    """README's SDK example, as written: `on_stdout=print` prints each line once."""
    example = readme_block("## Python SDK", "python")
    assert "on_stdout=print" in example
    done = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        env={**server.env, "CORRAL_SERVER": server.url, "CORRAL_API_KEY": server.key},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # echo $A; python3 -V: two lines from the callback, then the result's own print.
    assert lines[0] == "1" and lines[1].startswith("Python 3."), done.stdout
    assert lines[2] == "0 exited 1", done.stdout
