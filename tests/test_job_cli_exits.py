"""How `corral job` exits for a job that ended badly: a timed-out job is 124, not 137.

The job's command was killed at its timeout, so its own exit code is 137 — the same as a
`kill -9` or an out-of-memory kill. The CLI must tell them apart (README's exit-code table).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import LiveServer

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("sandbox_host")]

EXIT_TIMED_OUT = 124
EXIT_KILLED = 137


def test_a_timed_out_job_exits_124_with_follow_wait_and_logs(server: LiveServer) -> None:
    followed = server.corral("job", "submit", "--timeout", "1", "--follow", "--", "sleep", "30")
    assert followed.returncode == EXIT_TIMED_OUT, followed.stderr
    job_id = followed.stderr.split()[1]  # "job ID queued"
    got = json.loads(server.corral("job", "get", job_id, "-o", "json").stdout)
    assert got["state"] == "timed_out"

    waited = server.corral("job", "submit", "--timeout", "1", "--wait", "--", "sleep", "30")
    assert waited.returncode == EXIT_TIMED_OUT, waited.stderr

    logs = server.corral("job", "logs", "-f", job_id)
    assert logs.returncode == EXIT_TIMED_OUT, logs.stderr


def test_a_job_killed_by_a_signal_keeps_137(server: LiveServer) -> None:
    """A command that dies of SIGKILL by itself is a failure with its own code: 137."""
    done = server.corral("job", "submit", "--shell", "--wait", "--", "kill -9 $$")
    assert done.returncode == EXIT_KILLED, done.stderr
