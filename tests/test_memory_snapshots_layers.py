"""A gvisor sandbox of a layer template writes its `/` to a host disk, through runsc's
gofer: its pause to disk keeps that disk's changes beside the checkpoint, so resume
finds its processes going and its files (written, changed, deleted) as they were.
Through a real server whose `base` comes from the cached tar."""

from __future__ import annotations

import signal

import pytest

from corral import Sandbox
from corral.config import Settings
from tests.conftest import opts, require_backend, start_server
from tests.kit import e2b_base
from tests.kit.polling import wait_until

pytestmark = [pytest.mark.sandbox, *e2b_base.needs_base()]

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /home/user/count; sleep 0.1; done"


def _count(sbx: Sandbox) -> int | None:
    done = sbx.commands.run(["cat", "/home/user/count"])
    return int(done.stdout) if done.exit_code == 0 and done.stdout.strip() else None


def test_a_gvisor_sandbox_of_a_layer_template_keeps_processes_and_files_paused_to_disk(
    settings: Settings,
) -> None:
    require_backend(settings, "gvisor")
    with (
        e2b_base.server_with_base(settings, "memory-pause-layers") as server,
        Sandbox.create("base", isolation="gvisor", timeout=120, **opts(server)) as sbx,
    ):
        sbx.files.write("/home/user/note", "kept")
        done = sbx.commands.run(["sudo", "rm", "/etc/issue"])
        assert done.exit_code == 0, done.stderr
        sbx.commands.run(["sh", "-c", COUNTER], background=True, tag="counter")
        wait_until(lambda: _count(sbx), "the counter to count")
        [pid] = [p.pid for p in sbx.commands.list() if p.tag == "counter"]

        sbx.pause(keep_memory=False)
        assert (server.data_dir / "paused" / f"{sbx.sandbox_id}.checkpoint").is_dir()
        info = sbx.resume()
        assert "restored with its memory" in info.state_reason
        assert [p.pid for p in sbx.commands.list() if p.tag == "counter"] == [pid]
        before = _count(sbx) or 0
        wait_until(lambda: (_count(sbx) or 0) > before, "the counter to go on")
        assert sbx.files.read("/home/user/note") == "kept"
        assert sbx.commands.run(["test", "-e", "/etc/issue"]).exit_code == 1  # still deleted
        assert sbx.commands.run(["id", "-un"]).stdout == "user\n"


def test_a_gvisor_sandbox_of_a_layer_template_paused_to_disk_survives_a_server_crash(
    settings: Settings,
) -> None:
    require_backend(settings, "gvisor")
    data = settings.runtime_dir / "memory-pause-layers-crash"
    e2b_base.install(data)
    first = start_server(settings, data, pool_size=0)
    try:
        sbx = Sandbox.create("base", isolation="gvisor", timeout=120, **opts(first))
        sbx.files.write("/home/user/note", "kept")
        sbx.commands.run(["sh", "-c", COUNTER], background=True, tag="counter")
        wait_until(lambda: _count(sbx), "the counter to count")
        sbx.pause(keep_memory=False)
    finally:
        first.stop(signal.SIGKILL)
    second = start_server(settings, data, pool_size=0)
    try:
        again = Sandbox.connect(sbx.sandbox_id, **opts(second))  # resumes it
        assert "restored with its memory" in again.info.state_reason
        before = _count(again) or 0
        wait_until(lambda: (_count(again) or 0) > before, "the counter to go on")
        assert again.files.read("/home/user/note") == "kept"
        again.kill()
        assert not list((data / "paused").iterdir())
    finally:
        second.stop()
