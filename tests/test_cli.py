"""The `corral` command as a subprocess, the way users run it, against a real server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corral.config import Settings
from tests.conftest import LiveServer, free_port
from tests.kit.polling import wait_until

pytestmark = pytest.mark.acceptance

sandboxes = pytest.mark.usefixtures("sandbox_host")


@sandboxes
def test_run_streams_output_and_passes_the_exit_code(server: LiveServer) -> None:
    done = server.corral("run", "-e", "WHO=world", "--", "sh", "-c", "echo hello $WHO; exit 7")
    assert done.stdout == "hello world\n"
    assert done.returncode == 7


@sandboxes
def test_run_reports_a_timeout(server: LiveServer) -> None:
    done = server.corral("run", "--timeout", "0.3", "--", "sleep", "10")
    assert done.returncode == 137
    assert "timeout" in done.stderr


@sandboxes
def test_run_uploads_files_first(server: LiveServer, tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("print('from a file')\n")
    done = server.corral("run", "--file", f"{script}:job/hello.py", "--", "python3", "job/hello.py")
    assert (done.returncode, done.stdout) == (0, "from a file\n"), done.stderr


def test_bad_input_gets_one_clear_line_and_exit_2(server: LiveServer) -> None:
    done = server.corral("run", "--isolation", "nope", "--", "true")
    assert done.returncode == 2
    assert "'nope'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = server.corral("run", "-e", "NOEQUALS", "--", "true")
    assert done.returncode == 2 and "KEY=VALUE" in done.stderr


def test_exit_codes_name_what_went_wrong(server: LiveServer) -> None:
    done = server.corral("sandbox", "get", "sb_0123456789abcdef0123")
    assert done.returncode == 4 and "corral sandbox list" in done.stderr
    done = server.corral("sandbox", "list", CORRAL_API_KEY="crl_" + "z" * 32)
    assert done.returncode == 5 and "API key" in done.stderr
    done = server.corral("sandbox", "list", CORRAL_SERVER=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 7 and "did not answer" in done.stderr


@sandboxes
def test_sandbox_commands_are_api_calls(server: LiveServer, tmp_path: Path) -> None:
    created = server.corral("sandbox", "create", "--metadata", "by=cli", "--output", "json")
    assert created.returncode == 0, created.stderr
    sandbox_id = json.loads(created.stdout)["sandbox_id"]
    try:
        listed = json.loads(server.corral("sandbox", "list", "-m", "by=cli", "-o", "json").stdout)
        assert [s["sandbox_id"] for s in listed] == [sandbox_id]
        assert sandbox_id in server.corral("sandbox", "list").stdout  # the table, id whole

        done = server.corral(
            "sandbox", "exec", sandbox_id, "--", "sh", "-c", "echo made > f; exit 3"
        )
        assert done.returncode == 3
        assert server.corral("sandbox", "cat", sandbox_id, "f").stdout == "made\n"

        local = tmp_path / "up.bin"
        local.write_bytes(b"\x00\x01binary")
        assert server.corral("sandbox", "cp", str(local), f"{sandbox_id}:up.bin").returncode == 0
        back = tmp_path / "back.bin"
        assert server.corral("sandbox", "cp", f"{sandbox_id}:up.bin", str(back)).returncode == 0
        assert back.read_bytes() == b"\x00\x01binary"
        entries = json.loads(server.corral("sandbox", "ls", sandbox_id, "-o", "json").stdout)
        assert {e["name"] for e in entries} == {"f", "up.bin"}

        started = server.corral("sandbox", "exec", "--background", sandbox_id, "sleep", "30")
        pid = int(started.stdout.strip())
        ps = json.loads(server.corral("sandbox", "ps", sandbox_id, "-o", "json").stdout)
        assert [p["pid"] for p in ps] == [pid]

        assert "paused" in server.corral("sandbox", "pause", sandbox_id).stdout
        done = server.corral("sandbox", "exec", sandbox_id, "true")
        assert done.returncode == 8 and "resume" in done.stderr
        assert "running" in server.corral("sandbox", "resume", sandbox_id).stdout
        assert server.corral("sandbox", "timeout", sandbox_id, "600").returncode == 0
        assert server.corral("sandbox", "metrics", sandbox_id).returncode == 0
        got = json.loads(server.corral("sandbox", "get", sandbox_id, "-o", "json").stdout)
        assert got["state"] == "running" and got["metadata"] == {"by": "cli"}
    finally:
        assert server.corral("sandbox", "kill", sandbox_id).returncode == 0
    got = json.loads(server.corral("sandbox", "get", sandbox_id, "-o", "json").stdout)
    assert got["state"] == "killed"


def test_contexts_choose_the_server_and_key(server: LiveServer, tmp_path: Path) -> None:
    config = str(tmp_path / "config")
    env = {"CORRAL_CONFIG": config, "CORRAL_SERVER": "", "CORRAL_API_KEY": ""}
    dead = f"http://127.0.0.1:{free_port()}"
    assert server.corral("context", "set", "dead", "--server", dead, env=env).returncode == 0
    done = server.corral(
        "context", "set", "live", "--server", server.url, "--api-key", server.key, env=env
    )
    assert done.returncode == 0
    listing = server.corral("context", "list", env=env).stdout
    assert "* dead" in listing.replace("  ", " ") or listing.index("*") < listing.index("dead")
    assert server.corral("sandbox", "list", env=env).returncode == 7  # current: dead
    assert server.corral("--context", "live", "sandbox", "list", env=env).returncode == 0
    assert server.corral("context", "use", "live", env=env).returncode == 0
    assert server.corral("sandbox", "list", env=env).returncode == 0
    assert server.corral("--server", dead, "sandbox", "list", env=env).returncode == 7
    assert oct(Path(config).stat().st_mode & 0o777) == "0o600"  # it holds keys
    done = server.corral("context", "use", "nope", env=env)
    assert done.returncode == 4 and "corral context set nope" in done.stderr


def test_admin_keys_work_until_revoked(server: LiveServer) -> None:
    assert server.corral("admin", "team", "create", "cli-team").returncode == 0
    done = server.corral("admin", "team", "create", "cli-team")
    assert done.returncode == 2 and "exists" in done.stderr
    made = server.corral("admin", "key", "create", "--team", "cli-team")
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("crl_")
    assert server.corral("sandbox", "list", CORRAL_API_KEY=key).returncode == 0
    assert server.corral("admin", "key", "revoke", key[:12]).returncode == 0
    # The server remembers a key's team for half a second (server/auth.py KeyCache).
    wait_until(
        lambda: server.corral("sandbox", "list", CORRAL_API_KEY=key).returncode == 5,
        "the revoked key to be refused",
        timeout=5,  # each try is a CLI process of its own
    )
    teams = json.loads(server.corral("admin", "team", "list", "-o", "json").stdout)
    assert "cli-team" in [t["name"] for t in teams]


def test_admin_team_set_changes_quotas_at_the_next_request(server: LiveServer) -> None:
    assert server.corral("admin", "team", "create", "set-team").returncode == 0
    made = server.corral("admin", "key", "create", "--team", "set-team")
    key = made.stdout.strip().splitlines()[-1]
    nothing = server.corral("admin", "team", "set", "set-team")
    assert nothing.returncode == 2 and "at least one quota" in nothing.stderr
    bad = server.corral("admin", "team", "set", "set-team", "--max-cpu", "0")
    assert bad.returncode == 2 and "max_cpu=0" in bad.stderr
    done = server.corral("admin", "team", "set", "set-team", "--max-sandboxes", "1")
    assert done.returncode == 0 and "max_sandboxes=1" in done.stdout
    first = server.corral("sandbox", "create", CORRAL_API_KEY=key)
    assert first.returncode == 0, first.stderr
    second = server.corral("sandbox", "create", CORRAL_API_KEY=key)  # the live server sees it
    assert second.returncode == 6 and "max_sandboxes" in second.stderr
    teams = json.loads(server.corral("admin", "team", "list", "-o", "json").stdout)
    assert [t["max_sandboxes"] for t in teams if t["name"] == "set-team"] == [1]


def test_help_shows_each_option_s_environment_variable(server: LiveServer) -> None:
    for args, variables in [
        ((), ["CORRAL_SERVER", "CORRAL_API_KEY", "CORRAL_CONTEXT"]),
        (("server",), ["CORRAL_HOST", "CORRAL_PORT", "CORRAL_DATA_DIR", "CORRAL_POOL_SIZE"]),
        (("run",), ["CORRAL_TEMPLATE", "CORRAL_ISOLATION", "CORRAL_RUN_TIMEOUT"]),
        (("sandbox", "list"), ["CORRAL_OUTPUT"]),
    ]:
        done = server.corral(*args, "--help", COLUMNS="200")
        for variable in variables:
            assert variable in done.stdout, (args, variable)


def test_doctor_lists_the_tiers(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "doctor"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "namespace" in done.stdout and "process" in done.stdout


@sandboxes
def test_ctrl_c_kills_the_sandbox_of_run(server: LiveServer) -> None:
    process = server.cli_process(
        "run", "-m", "by=ctrl-c", "--", "sh", "-c", "echo started; sleep 30"
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "started\n"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    listed = server.corral("sandbox", "list", "-m", "by=ctrl-c", "-o", "json")
    assert json.loads(listed.stdout) == []
