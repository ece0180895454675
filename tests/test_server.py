"""The server as a process: signals, graceful shutdown, a crash and a restart, the demo."""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from corral import Sandbox
from corral.config import Settings
from corral.errors import InvalidRequest
from tests.conftest import LiveServer, free_port, start_server
from tests.kit import processes
from tests.kit.polling import wait_until

pytestmark = pytest.mark.usefixtures("sandbox_host")


def processes_with(marker: bytes) -> list[int]:
    """Live (not zombie) host processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.TransportError:
        return False
    return True


def fresh_server(settings: Settings) -> LiveServer:
    return start_server(settings, settings.runtime_dir / f"data-{secrets.token_hex(4)}")


def info_after_restart(settings: Settings, live: LiveServer, sandbox_id: str) -> tuple[str, str]:
    again = start_server(settings, live.data_dir)
    try:
        box = Sandbox.connect(sandbox_id, resume=False, server=again.url, api_key=again.key)
        box.close()
        return box.info.state, box.info.state_reason
    finally:
        assert again.stop() == 0


def test_sigkill_leaves_nothing_running_and_a_restart_marks_it_failed(
    settings: Settings,
) -> None:
    live = fresh_server(settings)
    seconds = f"{secrets.randbelow(9000) + 1000}.{secrets.randbelow(999)}"
    box = Sandbox.create(server=live.url, api_key=live.key)
    handle = box.commands.run(["sleep", seconds], background=True)
    handle.disconnect()
    box.close()
    assert processes_with(seconds.encode())
    live.stop(signal.SIGKILL)
    wait_until(lambda: processes_with(seconds.encode()) == [], "the sandbox to die with its server")
    state, reason = info_after_restart(settings, live, box.sandbox_id)
    assert state == "failed" and "stopped" in reason


def test_sigterm_drains_and_kills_the_sandboxes(settings: Settings) -> None:
    live = fresh_server(settings)
    box = Sandbox.create(server=live.url, api_key=live.key)
    box.close()
    assert live.stop(signal.SIGTERM) == 0
    assert "server stopped" in live.log.read_text()
    state, reason = info_after_restart(settings, live, box.sandbox_id)
    assert state == "killed" and "shut down" in reason


def test_a_closed_sdk_sandbox_leaves_no_stream_for_the_drain_to_wait_on(
    settings: Settings,
) -> None:
    """`close()` stops following a background command: its output stream ends, so a
    SIGTERM drains at once instead of waiting the whole grace (it waited it before)."""
    live = start_server(
        settings,
        settings.runtime_dir / f"data-{secrets.token_hex(4)}",
        extra_env={"CORRAL_SHUTDOWN_GRACE": "300"},
    )
    box = Sandbox.create(server=live.url, api_key=live.key)
    handle = box.commands.run("sleep 600", background=True)
    box.close()
    with pytest.raises(InvalidRequest, match="no longer followed"):
        handle.wait()
    assert live.stop(signal.SIGTERM, timeout=120) == 0  # not 300 s: nothing left to drain
    assert "forced exit" not in live.log.read_text()


def test_a_second_signal_forces_the_exit(settings: Settings) -> None:
    live = fresh_server(settings)
    box = Sandbox.create(server=live.url, api_key=live.key)
    box.commands.run("sleep 60", background=True)  # an open stream: draining would wait
    live.process.send_signal(signal.SIGINT)
    wait_until(lambda: not answers(live.url), "the first signal to close the listener")
    time.sleep(0.6)  # a signal within 0.5 s of the first is that one twice (server/main.py)
    started = time.monotonic()
    live.process.send_signal(signal.SIGINT)
    assert live.process.wait(10) == 130
    assert time.monotonic() - started < 5


def test_demo_runs_a_first_command_through_the_api(settings: Settings) -> None:
    data = settings.runtime_dir / f"demo-{secrets.token_hex(4)}"
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_RUNTIME_DIR": str(settings.runtime_dir),
        "CORRAL_CGROUP_PARENT": settings.cgroup_parent,
    }
    log = data.parent / f"demo-{port}.log"
    with log.open("wb") as sink:
        process = processes.spawn(
            [sys.executable, "-m", "corral.cli", "server", "--demo", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    assert process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read)
    reader.start()
    output = ""
    deadline = time.monotonic() + 60
    while "uv run python" not in output and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            output += lines.get(timeout=0.5)
    try:
        assert "hello from sb-" in output and "exit code 0" in output, output + log.read_text()
        assert "next" in output and "corral run" in output
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        returncode = process.wait(30)
        reader.join(5)
        process.stdout.close()
    assert returncode == 0
