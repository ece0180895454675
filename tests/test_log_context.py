"""One logger: JSON lines configured by entry points only, with the ids of the request,
team, sandbox and job attached from context rather than written into messages."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral import Jobs, Sandbox, logs
from tests.conftest import LiveServer
from tests.kit.polling import wait_until

Line = dict[str, Any]


def log_lines(path: Path) -> Iterator[Line]:
    for text in path.read_text().splitlines():
        if text.startswith("{"):
            yield json.loads(text)


def wait_for_line(path: Path, matches: Callable[[Line], bool], within: float = 30) -> Line:
    """The first line of the log at `path` that `matches`, once it is written."""
    return wait_until(
        lambda: next((line for line in log_lines(path) if matches(line)), None),
        f"a matching line in {path}",
        timeout=within,
    )


def default_team_id(server: LiveServer) -> str:
    done = server.corral("admin", "team", "list", "-o", "json")
    assert done.returncode == 0, done.stderr
    team_id: str = next(t["id"] for t in json.loads(done.stdout) if t["name"] == "default")
    return team_id


def test_a_record_carries_the_ids_bound_to_its_work() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("info", stream)
        logs.start(request_id="req_1", team_id="t1")
        logs.bind(sandbox_id="s1")
        logging.getLogger("corral.test").info("hello", extra={"team_id": "given"})
        logs.start(job_id="j1")  # new work: the request's ids are gone
        logging.getLogger("corral.test").info("next")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logs.start()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello" and first["request_id"] == "req_1"
    assert first["sandbox_id"] == "s1" and first["team_id"] == "given"  # extra wins
    assert second["job_id"] == "j1" and "request_id" not in second and "team_id" not in second


def test_the_engine_as_a_library_configures_no_logging(tmp_path: Path) -> None:
    code = (
        "import logging, pathlib, corral, corral.isolation, corral.sandboxes, "
        "corral.jobs.worker, corral.store, corral.server.app; "
        "from corral.isolation import Engine; from corral.config import Settings; "
        f"Engine(Settings(runtime_dir=pathlib.Path({str(tmp_path)!r}), "
        "cgroup_parent='corral-test')); "
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout == "ok\n", done.stderr


@pytest.mark.usefixtures("sandbox_host")
def test_a_log_line_of_an_rpc_carries_its_request_and_team(server: LiveServer) -> None:
    team_id = default_team_id(server)
    sbx = Sandbox.create(server=server.url, api_key=server.key)
    sbx.kill()
    sandbox_id = sbx.sandbox_id
    ended = wait_for_line(
        server.log, lambda line: line["msg"] == "sandbox ended" and line["sandbox_id"] == sandbox_id
    )
    assert ended["team_id"] == team_id
    assert ended["request_id"].startswith("req_")
    created = wait_for_line(
        server.log,
        lambda line: line["msg"] == "sandbox created" and line["sandbox_id"] == sandbox_id,
    )
    assert created["request_id"].startswith("req_")
    assert created["request_id"] != ended["request_id"]  # one id per request
    assert sandbox_id not in ended["msg"]


@pytest.mark.usefixtures("sandbox_host")
def test_a_job_s_log_lines_carry_its_job_and_team(server: LiveServer) -> None:
    team_id = default_team_id(server)
    with Jobs(server=server.url, api_key=server.key) as jobs:
        job = jobs.submit(run="exit 0").job
        jobs.wait(job.id, timeout=60)
    ended = wait_for_line(
        server.log, lambda line: line["msg"] == "job attempt ended" and line["job_id"] == job.id
    )
    assert ended["team_id"] == team_id
    assert ended["sandbox_id"].startswith("s")  # the sandbox the job ran in
    assert "request_id" not in ended  # run by the worker, not within the submitting request
