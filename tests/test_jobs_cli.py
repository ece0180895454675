"""`corral job …` as a subprocess, the way users run it, against a real server."""

from __future__ import annotations

import json
import re
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

from corral import Jobs
from corral.config import Settings
from tests.conftest import LiveServer, serve, start_server

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("sandbox_host")]

# The issue's example, as written: its `test` step fails (no tests in a fresh sandbox).
ISSUE_EXAMPLE = """\
kind: workflow
template: host
timeout: 300
steps:
  - run: echo building          # shell string
  - name: test
    command: [python3, -m, pytest, -q]
    timeout: 120
  - code: print("hello")
    language: python
    continue_on_error: true
"""

# The same shape with a test step that passes, and a last step that fails but may.
PASSING_WORKFLOW = """\
kind: workflow
template: host
timeout: 300
labels: {suite: "%s"}
steps:
  - run: echo building
  - name: test
    command: [python3, -c, "print('tested')"]
    timeout: 120
  - code: print("hello"); raise SystemExit(3)
    language: python
    continue_on_error: true
"""


def submit_json(server: LiveServer, *args: str) -> dict[str, Any]:
    done = server.corral("job", "submit", "--output", "json", *args)
    assert done.returncode == 0, done.stderr
    submission: dict[str, Any] = json.loads(done.stdout)
    return submission


def get_json(server: LiveServer, job_id: str) -> dict[str, Any]:
    done = server.corral("job", "get", job_id, "-o", "json")
    assert done.returncode == 0, done.stderr
    job: dict[str, Any] = json.loads(done.stdout)
    return job


def events_json(server: LiveServer, job_id: str) -> list[dict[str, Any]]:
    done = server.corral("job", "events", job_id, "-o", "json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_workflow_file_runs_to_success(server: LiveServer, tmp_path: Path) -> None:
    suite = secrets.token_hex(4)
    spec = tmp_path / "job.yaml"
    spec.write_text(PASSING_WORKFLOW % suite)
    done = server.corral("job", "submit", "-f", str(spec), "--wait", "-o", "json")
    assert done.returncode == 0, done.stderr  # succeeded: the failing step may fail
    submission = json.loads(done.stdout)
    job = submission["job"]
    assert submission["created"] is True and submission["callback_secret"] == ""
    assert job["state"] == "succeeded" and job["exit_code"] == 3
    assert "failed but continued" in job["state_reason"]
    assert job["spec"]["kind"] == "workflow" and len(job["spec"]["steps"]) == 3

    logs = server.corral("job", "logs", job["id"])
    assert (logs.returncode, logs.stdout) == (0, "building\ntested\nhello\n")
    listed = json.loads(
        server.corral("job", "list", "--label", f"suite={suite}", "-o", "json").stdout
    )
    assert [j["id"] for j in listed] == [job["id"]]

    table = server.corral("job", "get", job["id"])
    assert table.returncode == 0
    assert job["id"] in table.stdout and "succeeded" in table.stdout and "3 steps" in table.stdout


def test_the_issue_example_stops_at_its_failing_step(server: LiveServer, tmp_path: Path) -> None:
    spec = tmp_path / "issue.yaml"
    spec.write_text(ISSUE_EXAMPLE)
    job_id = submit_json(server, "-f", str(spec))["job"]["id"]
    followed = server.corral("job", "logs", "-f", job_id)
    assert followed.stdout.startswith("building\n")
    assert "hello" not in followed.stdout  # step 3 never ran

    job = get_json(server, job_id)
    assert job["state"] == "failed" and job["state_reason"].startswith("test: exited with code")
    assert job["exit_code"] not in (None, 0)
    assert followed.returncode == job["exit_code"]  # `logs -f` exits with the job's code

    events = events_json(server, job_id)
    steps = [
        (e["type"], e["data"]["step"], e["data"].get("state"))
        for e in events
        if "step" in e["data"]
    ]
    assert steps == [
        ("step_start", 0, None),
        ("step_end", 0, "succeeded"),
        ("step_start", 1, None),
        ("step_end", 1, "failed"),
    ]
    assert [e["state"] for e in events if e["type"] == "state"] == ["queued", "running", "failed"]
    lines = server.corral("job", "events", job_id).stdout.splitlines()
    assert len(lines) == len(events) and "step_end" in lines[5] and "test" in lines[5]


def test_inline_submit_with_options_and_idempotency(server: LiveServer) -> None:
    suite = secrets.token_hex(4)
    key = f"k-{suite}"
    args = [
        "--label",
        f"suite={suite}",
        "-e",
        "WHO=cli",
        "--retries",
        "1",
        "--idempotency-key",
        key,
    ]
    first = submit_json(server, *args, "--shell", "--", "echo hello $WHO")
    again = submit_json(server, *args, "--shell", "--", "echo hello $WHO")
    assert first["created"] and not again["created"]
    assert again["job"]["id"] == first["job"]["id"]
    assert first["job"]["spec"] == {
        "kind": "shell",
        "run": "echo hello $WHO",
        "env": {"WHO": "cli"},
        "retries": 1,
        "labels": {"suite": suite},
    }
    assert first["job"]["max_attempts"] == 2
    logs = server.corral("job", "logs", "-f", first["job"]["id"])
    assert (logs.returncode, logs.stdout) == (0, "hello cli\n")

    code = submit_json(server, "--code", "python", "--", "print(6 * 7)")["job"]
    assert code["spec"]["language"] == "python"
    argv = submit_json(server, "--", "sh", "-c", "echo $0 $1", "a b", "c")["job"]
    assert argv["spec"]["command"] == ["sh", "-c", "echo $0 $1", "a b", "c"]
    assert server.corral("job", "logs", "-f", argv["id"]).stdout == "a b c\n"

    secret = server.corral("job", "submit", "--callback-url", "http://127.0.0.1:9/x", "--", "true")
    assert secret.returncode == 0 and re.search(r"callback secret: [0-9a-f]{64}", secret.stdout)


def test_submit_follow_streams_and_exits_with_the_job_s_code(server: LiveServer) -> None:
    done = server.corral("job", "submit", "-F", "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert done.returncode == 7
    assert done.stdout == "out\n"
    assert "err\n" in done.stderr and re.search(r"job j[0-9a-f]+ queued", done.stderr)


def test_logs_follow_is_live_and_exits_with_the_job_s_code(server: LiveServer) -> None:
    job_id = submit_json(server, "--shell", "--", "echo started; sleep 5; echo done >&2; exit 3")[
        "job"
    ]["id"]
    process = server.cli_process("job", "logs", "-f", job_id)
    assert process.stdout is not None
    assert process.stdout.readline() == "started\n"
    # Live: the line came while the job still runs. Asked in-process (milliseconds), not
    # through a second CLI whose start on a loaded machine could outlast the job's sleep.
    with Jobs(server=server.url, api_key=server.key) as jobs:
        assert jobs.get(job_id).state == "running"
    stdout, stderr = process.communicate(timeout=60)
    assert (process.returncode, stdout, stderr) == (3, "", "done\n")


def test_list_events_cancel_and_retry(server: LiveServer) -> None:
    suite = secrets.token_hex(4)
    job_id = submit_json(server, "-l", f"suite={suite}", "--", "sleep", "60")["job"]["id"]
    listed = server.corral(
        "job", "list", "-l", f"suite={suite}", "--state", "queued", "--state", "running"
    )
    assert listed.returncode == 0 and job_id in listed.stdout

    canceled = server.corral("job", "cancel", job_id, "--reason", "by the test", "-o", "json")
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(canceled.stdout)["id"] == job_id
    followed = server.corral("job", "logs", "-f", job_id)
    assert followed.returncode == 125  # canceled, no exit code of its own
    job = get_json(server, job_id)
    assert job["state"] == "canceled" and "by the test" in job["state_reason"]
    assert "canceled" in server.corral("job", "events", job_id).stdout

    retried = server.corral("job", "retry", job_id, "-o", "json")
    assert retried.returncode == 0 and json.loads(retried.stdout)["state"] == "queued"
    assert server.corral("job", "cancel", job_id).returncode == 0

    for _ in range(3):
        submit_json(server, "-l", f"suite={suite}", "--", "true")
    limited = json.loads(
        server.corral("job", "list", "-l", f"suite={suite}", "--limit", "2", "-o", "json").stdout
    )
    assert len(limited) == 2
    every = server.corral("job", "list", "-l", f"suite={suite}", "--limit", "0", "-o", "json")
    assert len(json.loads(every.stdout)) == 4


def test_bad_input_gets_a_clear_line_and_the_right_code(server: LiveServer, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("kind: command\ncomand: [echo, hi]\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: workflow\nsteps: [\n")
    broken_json = tmp_path / "job.json"
    broken_json.write_text('{"kind": "command",')
    cases: list[tuple[tuple[str, ...], str | None, str]] = [
        (("submit", "-f", str(unknown)), None, f"{unknown}: job spec: unknown field 'comand'"),
        (("submit", "-f", str(broken)), None, f"{broken} is not valid YAML: line 3"),
        (("submit", "-f", str(broken_json)), None, f"{broken_json} is not valid JSON: line 1"),
        (("submit", "-f", "-"), "- just a list\n", "stdin must hold a mapping"),
        (("submit", "-f", "-"), "kind: shell\n", "stdin: kind shell needs 'run'"),
        (("submit", "-f", str(tmp_path / "missing.yaml")), None, "cannot read the job spec"),
        (("submit",), None, "say what to run"),
        (("submit", "--code", "cobol", "--", "x"), None, "--code 'cobol': use one of python"),
        (("submit", "-f", str(unknown), "--", "echo"), None, "either -f FILE or a command"),
        (("submit", "--retries", "99", "--", "true"), None, "retries: 99 is out of range"),
        (("submit", "-l", "novalue", "--", "true"), None, "--label 'novalue' is not KEY=VALUE"),
        (("list", "--state", "done"), None, "unknown job state 'done'"),
        (("logs", "j1", "--offset", "-1"), None, "--offset: use 0 or more"),  # before any call
        (("events", "j1", "--offset", "-1"), None, "--offset: use 0 or more"),
    ]
    for args, stdin, message in cases:
        done = server.corral("job", *args, input=stdin)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr

    for args in (("get",), ("logs",), ("logs", "-f"), ("events",), ("cancel",), ("retry",)):
        done = server.corral("job", *args, "j0000000000000000000")
        assert done.returncode == 4 and "corral job list" in done.stderr, (args, done.stderr)


# -- a server restart under `job logs -f` --------------------------------------------------


def restart_on_the_same_port(live: LiveServer) -> LiveServer:
    """A new `corral server` on the stopped one's data dir and address (what a user does)."""
    process = serve(int(live.url.rsplit(":", 1)[1]), live.env, live.log)
    return LiveServer(live.url, live.key, live.data_dir, live.env, process, live.log)


def test_logs_follow_survives_a_server_restart(settings: Settings) -> None:
    data_dir = settings.runtime_dir / f"restart-{secrets.token_hex(4)}"
    first = start_server(settings, data_dir, extra_env={"CORRAL_JOB_LEASE": "3"})
    second: LiveServer | None = None
    try:
        # Attempt 1 prints slowly, so that it still runs when the server dies however late
        # the follower starts on a loaded machine; the retry prints at full speed.
        script = (
            'pause=0.5; [ "$CORRAL_JOB_ATTEMPT" = 1 ] || pause=0.01; '
            "for i in $(seq 1 40); do echo line $i; sleep $pause; done"
        )
        job_id = submit_json(first, "--shell", "--", script)["job"]["id"]
        follower = first.cli_process("job", "logs", "-f", job_id)
        assert follower.stdout is not None
        seen = [follower.stdout.readline() for _ in range(5)]
        assert seen == [f"line {i}\n" for i in range(1, 6)]
        first.stop(signal.SIGKILL)  # mid-job: its worker dies with it
        second = restart_on_the_same_port(first)

        rest, stderr = follower.communicate(timeout=90)
        assert follower.returncode == 0, stderr
        numbers = [int(line.removeprefix("line ")) for line in (seen + rest.splitlines(True))]
        restart = numbers.index(1, 1)  # attempt 2 starts again from line 1
        assert numbers[:restart] == list(range(1, restart + 1))  # attempt 1: nothing lost or twice
        assert numbers[restart:] == list(range(1, 41))  # the final attempt: every line once
        job = get_json(second, job_id)
        assert (job["state"], job["attempt"]) == ("succeeded", 2)
    finally:
        if second is not None:
            second.stop()
        first.stop(signal.SIGKILL)
