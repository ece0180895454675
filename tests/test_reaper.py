"""A live server reaps what a SIGKILLed `corral worker` left — mounts, cgroups, uid slots,
footprint directories — while it runs, without any process being restarted."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from corral import Jobs
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.isolation import Engine
from corral.isolation.cgroups import CgroupDriver
from tests.conftest import (
    holds_slot,
    host_processes_of_uid,
    slot_ids,
    start_server,
    start_worker,
)
from tests.kit.polling import wait_until

pytestmark = [pytest.mark.sandbox, pytest.mark.usefixtures("sandbox_host")]

REAP_INTERVAL = 1


def footprints_of(runtime_dir: Path, pid: int) -> list[dict[str, Any]]:
    """The records of the sandboxes (and shared files) that process `pid` owns."""
    found = []
    for state in (runtime_dir / "sandboxes").glob("*/state.json"):
        record = json.loads(state.read_text())
        if record["owner_pid"] == pid:
            found.append(record)
    return found


def running_sandbox(records: list[dict[str, Any]]) -> bool:
    """Whether one of `records` is a sandbox with its storage mounted and its cgroup."""
    return any(r["id"].startswith("sb_") and r["mounts"] and r["cgroup"] for r in records)


def leftovers(records: list[dict[str, Any]], settings: Settings) -> list[str]:
    """What of `records` is still on the host, described."""
    driver = CgroupDriver.detect(settings.cgroup_parent)
    mounts = Path("/proc/self/mounts").read_text()
    left = []
    for record in records:
        if Path(record["path"]).exists():
            left.append(f"directory {record['path']}")
        left += [f"mount {m}" for m in record["mounts"] if f" {m} " in mounts]
        if record["cgroup"] and driver.open(record["cgroup"]) is not None:
            left.append(f"cgroup {record['cgroup']}")
        if record["uid_slot"] is not None:
            if holds_slot(record, "uid"):
                left.append(f"uid slot {record['uid_slot']}")
            ids = slot_ids(settings, record["uid_slot"])
            left += [f"process {pid} of uid slot {ids}" for pid in host_processes_of_uid(*ids)]
    return left


@pytest.mark.parametrize("pool", ["1", "0"], ids=["warm", "one-shot"])
def test_a_live_server_reaps_what_a_killed_worker_left(own_runtime: Settings, pool: str) -> None:
    server = start_server(
        own_runtime,
        own_runtime.data_dir,
        pool_size=0,
        extra_env={
            "CORRAL_JOB_WORKERS": "0",  # the worker runs the job; the server only reaps
            "CORRAL_REAP_INTERVAL": str(REAP_INTERVAL),
        },
    )
    try:
        worker = start_worker(server, CORRAL_JOB_WORKERS="1", CORRAL_JOB_POOL=pool)
        with Jobs(server=server.url, api_key=server.key) as jobs:
            job = jobs.submit(run="sleep 600").job

            def set_up() -> list[dict[str, Any]] | None:
                records = footprints_of(own_runtime.runtime_dir, worker.process.pid)
                running = jobs.get(job.id).state == "running" and running_sandbox(records)
                return records if running else None

            records = wait_until(set_up, "the job to run in a sandbox that is all set up")
        assert leftovers(records, own_runtime)  # all there while the worker lives

        worker.stop(signal.SIGKILL)
        left: list[str] = []

        def reaped() -> bool:
            left[:] = leftovers(records, own_runtime)
            return not left

        try:
            wait_until(
                reaped,
                "the live server to reap what the killed worker left",
                timeout=10 * REAP_INTERVAL + 10,
                interval=0.2,
            )
        except AssertionError as exc:
            log_tail = "".join(server.log.read_text().splitlines(keepends=True)[-20:])
            raise AssertionError(f"{exc}; still there: {left}; server log:\n{log_tail}") from None
        assert server.process.poll() is None  # the same server, never restarted
        assert "reaped sandbox" in server.log.read_text()
    finally:
        server.stop()


async def test_a_reap_interval_that_is_not_positive_is_refused(settings: Settings) -> None:
    engine = Engine(settings.with_(reap_interval=0))
    with pytest.raises(InvalidRequest, match="CORRAL_REAP_INTERVAL=0 must be a positive"):
        engine.start_reaper()
    await engine.aclose()
