"""SIGHUP: a running server (and worker) reads its env file again, applies the log level at
once, logs what needs a restart, and refuses an invalid file keeping the running
configuration; the requests in flight meanwhile succeed. The env file itself (its form,
its place between the environment and the flags) is checked without a server."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral import Sandbox
from corral.config import Settings, read_env_file
from corral.errors import InvalidRequest
from tests.conftest import LiveServer, opts, start_server, start_worker
from tests.kit.polling import wait_until


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(t) for t in path.read_text().splitlines() if t.startswith("{")]


def wait_for(path: Path, msg: str, after: int = 0, **fields: str) -> dict[str, Any]:
    """The first line of the JSON log at `path`, past its first `after` lines, saying `msg`
    with `fields`."""

    def found() -> dict[str, Any] | None:
        for line in log_lines(path)[after:]:
            if line["msg"] == msg and all(line.get(k) == v for k, v in fields.items()):
                return line
        return None

    return wait_until(found, f"{msg!r} with {fields} in {path}")


# -- the env file, without a server ------------------------------------------------------


def test_the_env_file_reads_systemds_form(tmp_path: Path) -> None:
    path = tmp_path / "corral.env"
    path.write_text(
        "# comment\n; another\n\nCORRAL_PORT=9000\nCORRAL_LOG_LEVEL = 'debug'\n"
        'CORRAL_POOLS="gvisor:base=1"\n'
    )
    assert read_env_file(path) == {
        "CORRAL_PORT": "9000",
        "CORRAL_LOG_LEVEL": "debug",
        "CORRAL_POOLS": "gvisor:base=1",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("CORRAL_LOG_LEVLE=debug\n", r"corral.env:1: 'CORRAL_LOG_LEVLE=debug' is not CORRAL_"),
        ("# ok\nPORT 9000\n", r"corral.env:2: 'PORT 9000' is not CORRAL_<SETTING>=VALUE"),
        ("CORRAL_ENV_FILE=/etc/other\n", "is not CORRAL_<SETTING>=VALUE"),
    ],
)
def test_a_bad_env_file_line_is_refused_by_its_number(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "corral.env"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=message):
        Settings.load({"CORRAL_ENV_FILE": str(path)})


def test_a_missing_or_binary_env_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.env"
    with pytest.raises(InvalidRequest, match=r"CORRAL_ENV_FILE='.*nowhere.env' cannot be read"):
        Settings.load({}, env_file=str(missing))
    binary = tmp_path / "binary.env"
    binary.write_bytes(b"CORRAL_PORT=\xff\xfe\n")
    with pytest.raises(InvalidRequest, match=r"binary.env' is not UTF-8 text"):
        Settings.load({}, env_file=str(binary))


def test_the_env_file_wins_over_the_environment_and_a_flag_over_both(tmp_path: Path) -> None:
    path = tmp_path / "corral.env"
    path.write_text("CORRAL_PORT=9000\nCORRAL_LOG_LEVEL=debug\n")
    env = {"CORRAL_ENV_FILE": str(path), "CORRAL_PORT": "8000", "CORRAL_POOL_SIZE": "5"}
    settings = Settings.load(env, log_level="error")
    assert (settings.port, settings.log_level, settings.pool_size) == (9000, "error", 5)


def test_admin_reads_the_servers_env_file(tmp_path: Path) -> None:
    """`corral admin … --env-file /etc/corral/corral.env` works on the store the service uses."""
    path = tmp_path / "corral.env"
    path.write_text(f"CORRAL_DATA_DIR={tmp_path / 'data'}\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "admin", "team", "list", "--env-file", str(path)],
        capture_output=True,
        text=True,
        env=environ,
    )
    assert done.returncode == 0, done.stderr
    assert f"store: sqlite:///{tmp_path / 'data' / 'corral.db'}" in done.stderr


# -- a live server and worker ------------------------------------------------------------


@pytest.fixture(scope="module")
def reloading(settings: Settings) -> Iterator[tuple[LiveServer, Path]]:
    """A server (one warm sandbox: its refill logs at debug) reading an env file at info."""
    env_file = settings.runtime_dir / "reload" / "corral.env"
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.write_text("CORRAL_LOG_LEVEL=info\n")
    live = start_server(
        settings,
        settings.runtime_dir / "reload" / "data",
        pool_size=1,
        extra_env={"CORRAL_ENV_FILE": str(env_file)},
    )
    try:
        yield live, env_file
    finally:
        live.stop()


def test_sighup_applies_the_log_level_while_requests_run(
    reloading: tuple[LiveServer, Path],
) -> None:
    server, env_file = reloading
    wait_for(server.log, "warm pools")
    assert not any(line["level"] == "debug" for line in log_lines(server.log))
    seen = len(log_lines(server.log))
    sandbox = Sandbox.create(**opts(server))  # taken from the pool: it refills, at debug
    try:
        env_file.write_text("CORRAL_LOG_LEVEL=debug\n")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            # In flight across the signal: commands that outlast it, and a stream of calls.
            running = [pool.submit(sandbox.commands.run, "sleep 1; echo ok") for _ in range(2)]
            polls = pool.submit(
                lambda: [httpx.get(f"{server.url}/healthz").status_code for _ in range(50)]
            )
            server.process.send_signal(signal.SIGHUP)
            results = [future.result(timeout=60) for future in running]
            assert set(polls.result(timeout=60)) == {200}
        assert [(r.exit_code, r.stdout) for r in results] == [(0, "ok\n")] * 2
        line = wait_for(server.log, "configuration reloaded", after=seen)
        assert line["applied"] == "log_level=debug"
        assert line["restart_needed"] == "-"
    finally:
        sandbox.kill()
    # The refill after the sandbox left the pool, logged at debug now.
    wait_for(server.log, "warm pool sandbox ready", after=seen)
    assert server.process.poll() is None


def test_sighup_refuses_an_invalid_file_and_keeps_the_running_configuration(
    reloading: tuple[LiveServer, Path],
) -> None:
    server, env_file = reloading
    seen = len(log_lines(server.log))
    env_file.write_text("CORRAL_LOG_LEVEL=loud\n")
    server.process.send_signal(signal.SIGHUP)
    refused = wait_for(server.log, "configuration not reloaded: the running one is kept", seen)
    assert refused["level"] == "error"
    assert "CORRAL_LOG_LEVEL='loud' is unknown: use debug, info" in refused["error"]
    assert httpx.get(f"{server.url}/healthz").status_code == 200

    # A change that needs a restart is said, not applied; the live ones still are.
    seen = len(log_lines(server.log))
    env_file.write_text("CORRAL_LOG_LEVEL=warning\nCORRAL_POOL_SIZE=3\nCORRAL_SHUTDOWN_GRACE=5\n")
    server.process.send_signal(signal.SIGHUP)
    restart = wait_for(server.log, "changed settings that take effect only at the next start: "
                       "restart to apply", seen)  # fmt: skip
    assert restart["settings"] == "pool_size"
    reloaded = wait_for(server.log, "configuration reloaded", seen)
    assert reloaded["applied"] == "shutdown_grace=5, log_level=warning"
    assert reloaded["restart_needed"] == "pool_size"
    assert server.process.poll() is None


def test_a_worker_reloads_on_sighup(reloading: tuple[LiveServer, Path], tmp_path: Path) -> None:
    server, _ = reloading
    env_file = tmp_path / "worker.env"
    env_file.write_text("CORRAL_LOG_LEVEL=info\n")
    worker = start_worker(server, CORRAL_ENV_FILE=str(env_file), CORRAL_JOB_POOL="0")
    try:
        env_file.write_text("CORRAL_LOG_LEVEL=error\n")
        worker.process.send_signal(signal.SIGHUP)
        line = wait_for(worker.log, "configuration reloaded")
        assert line["applied"] == "log_level=error"
        assert worker.process.poll() is None
    finally:
        assert worker.stop() == 0


def test_a_sighup_while_starting_is_ignored_but_not_by_the_programs_started() -> None:
    code = (
        "import os, signal, subprocess, sys\n"
        "from corral import logs\n"
        "from corral.reload import hold_sighup\n"
        "logs.configure('info')\n"
        "hold_sighup()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "child = subprocess.run(['sh', '-c', 'kill -HUP $$; echo survived'])\n"
        "print('alive', child.returncode)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout == f"alive {-signal.SIGHUP}\n"  # the child died of it, as it should
    assert "reload asked for while starting: ignored" in done.stderr
