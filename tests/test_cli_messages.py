"""What the `corral` CLI says to a newcomer (issue 10, defects 1 and 8), run as users run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral import __version__
from tests.conftest import LiveServer, free_port
from tests.kit.polling import wait_until

pytestmark = pytest.mark.acceptance

sandboxes = pytest.mark.usefixtures("sandbox_host")


def corral_in(
    server: LiveServer, cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`server.corral` run from the directory `cwd`, with `env` in place of the server's."""
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        capture_output=True,
        text=True,
        env=env or {**server.env, "CORRAL_SERVER": server.url, "CORRAL_API_KEY": server.key},
        cwd=cwd,
        timeout=60,
    )


def test_admin_help_shows_no_bogus_data_dir_default(server: LiveServer) -> None:
    done = server.corral("admin", "key", "create", "--help", COLUMNS="200")
    assert done.returncode == 0
    assert "default: --data-dir" not in done.stdout
    assert "/var/lib/corral as root" in done.stdout


def test_admin_says_which_store_it_opened(server: LiveServer, tmp_path: Path) -> None:
    done = corral_in(server, tmp_path, "admin", "team", "create", "msg-team")
    assert done.returncode == 0, done.stderr
    assert f"store: sqlite:///{server.data_dir}/corral.db" in done.stderr
    made = corral_in(server, tmp_path, "admin", "key", "create", "--team", "msg-team")
    assert f"store: sqlite:///{server.data_dir}/corral.db" in made.stderr
    key = made.stdout.strip().splitlines()[-1]  # still the last line of stdout
    assert key.startswith("crl_")
    assert server.corral("sandbox", "list", CORRAL_API_KEY=key).returncode == 0
    elsewhere = tmp_path / "other"
    done = corral_in(server, tmp_path, "admin", "team", "list", "--data-dir", str(elsewhere))
    assert done.returncode == 0 and f"store: sqlite:///{elsewhere}/corral.db" in done.stderr
    assert list(tmp_path.iterdir()) == [elsewhere]  # no `./--data-dir`


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_admin_without_a_data_dir_uses_the_server_s_default(
    server: LiveServer, tmp_path: Path
) -> None:
    """No --data-dir, no CORRAL_DATA_DIR: root's default, /var/lib/corral. A private mount
    namespace with an empty tmpfs on /var/lib keeps the host's real store untouched."""
    env = {k: v for k, v in server.env.items() if k != "CORRAL_DATA_DIR"}
    corral = f"{sys.executable} -m corral.cli"
    script = (
        "mount -t tmpfs tmpfs /var/lib"
        f" && {corral} admin team create default-team"
        f" && {corral} admin key create --team default-team"
        f" && {corral} admin team list -o json"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("store: sqlite:////var/lib/corral/corral.db") == 3
    assert "default-team" in done.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written to the current directory


def test_unauthenticated_hint_has_the_real_key_create_syntax(server: LiveServer) -> None:
    done = server.corral("sandbox", "list", CORRAL_API_KEY="crl_" + "z" * 32)
    assert done.returncode == 5
    assert "corral admin key create --team TEAM" in done.stderr


def test_a_server_that_does_not_answer_is_named_with_the_way_to_start_one(
    server: LiveServer,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    done = server.corral("sandbox", "list", CORRAL_SERVER=dead)
    assert done.returncode == 7
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1
    assert f"the Corral server at {dead} did not answer" in line
    assert "corral server" in line and "make run" in line
    assert "Request failed" not in line and "error sending request" not in line


def test_bad_numbers_name_the_flag_and_are_refused(server: LiveServer) -> None:
    for args, flag in [
        (("sandbox", "create", "--timeout", "-5"), "--timeout"),
        (("sandbox", "create", "--memory-mib", "0"), "--memory-mib"),
        (("sandbox", "create", "--idle-timeout", "-1"), "--idle-timeout"),
        (("run", "--timeout", "-5", "--", "true"), "--timeout"),
    ]:
        done = server.corral(*args, "-m", "by=bad-numbers", COLUMNS="200")
        assert done.returncode == 2, (args, done.stderr)
        assert flag in done.stderr and "timeout_seconds" not in done.stderr, args
    listed = server.corral("sandbox", "list", "-m", "by=bad-numbers", "-o", "json")
    assert json.loads(listed.stdout) == []  # nothing was created


def test_version(server: LiveServer) -> None:
    done = server.corral("--version")
    assert (done.returncode, done.stdout) == (0, f"corral {__version__}\n")


@sandboxes
def test_sandbox_create_prints_the_id_alone(server: LiveServer) -> None:
    created = server.corral("sandbox", "create", "-m", "by=create-id")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    try:
        assert created.stdout == f"{sandbox_id}\n" and sandbox_id.startswith("sb_")
        got = json.loads(server.corral("sandbox", "get", sandbox_id, "-o", "json").stdout)
        assert got["metadata"] == {"by": "create-id"}
    finally:
        assert server.corral("sandbox", "kill", sandbox_id).returncode == 0


@sandboxes
def test_piped_tables_keep_one_line_per_row_and_round_cpu(server: LiveServer) -> None:
    long_value = "a-rather-long-metadata-value-" * 4
    created = server.corral("sandbox", "create", "-m", f"note={long_value}")
    sandbox_id = created.stdout.strip()
    try:
        busy = server.corral(
            "sandbox", "exec", "--background", sandbox_id, "sh", "-c", "while :; do :; done"
        )
        assert busy.returncode == 0, busy.stderr
        table = server.corral("sandbox", "get", sandbox_id, COLUMNS="")  # stdout is a pipe
        lines = table.stdout.splitlines()
        assert len(lines) == 2, table.stdout  # the header and one row, not wrapped
        assert long_value in lines[1]
        rows = wait_until(  # a point needs two samples, 5 s apart
            lambda: server.corral("sandbox", "metrics", sandbox_id).stdout.splitlines()[1:],
            "a metrics point",
            interval=1,
        )
        for row in rows:
            cpu = row.split()[2]  # at is two words: date and time
            assert len(cpu.partition(".")[2]) <= 2, row
    finally:
        assert server.corral("sandbox", "kill", sandbox_id).returncode == 0


def test_piped_doctor_does_not_wrap(server: LiveServer) -> None:
    done = server.corral("doctor", COLUMNS="")
    assert done.returncode == 0, done.stderr
    capacity = [line for line in done.stdout.splitlines() if "memory capacity" in line]
    assert len(capacity) == 1 and capacity[0].endswith("CORRAL_MEMORY_OVERCOMMIT)")
