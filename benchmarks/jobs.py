"""Jobs benchmark: throughput and queue latency of sandboxed jobs through the API.

    uv run python benchmarks/jobs.py --json
    uv run python benchmarks/jobs.py --json --database postgresql

The store is SQLite in the server's data dir, or with `--database postgresql` a
throwaway PostgreSQL cluster started for the run (as the tests start theirs:
`tests/kit/postgres.py`), stopped and deleted after; the server reaches it over its Unix
socket, as a single-host deployment would (TCP on loopback costs more per round trip).

Against a real `corral server` with its default worker pool (CORRAL_JOB_WORKERS), every
job in a fresh sandbox:
- jobs_per_s: 500 `true` jobs submitted at once, from the first Submit to the last job's
  finished_at (each job: claim, sandbox, run, output and end written, sandbox destroyed);
- queue_latency_ms: Submit → first output chunk read back through StreamLogs, 100 jobs
  one after another (`echo hi`), p50/p99;
and, in the same run, the engine's raw figures with the same concurrency and no queue:
create + `true` + destroy per second for one-shot sandboxes (what a busy worker runs) and
for sandboxes with a guest agent (what the warm pool holds), create → first output of
each, and a bare `bwrap true`. Targets (2 cores): jobs_per_s >= 50, queue_latency_ms
p50 <= 25.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.kit

from api import running_server
from common import database
from engine import create_to_first_output, percentiles, raw_bwrap, run_cli

from corral._state_enums import JOB_STATE_NUMBERS
from corral.config import Settings
from corral.isolation import Engine, Entrypoint
from corral.states import JOB_FINAL_STATES
from corral.v1 import jobs_pb2 as pb
from corral.v1.jobs_connect import JobServiceClient

CGROUP_PARENT = "corral-bench"
FINAL = {JOB_STATE_NUMBERS[state] for state in JOB_FINAL_STATES}


def _client(url: str) -> JobServiceClient:
    return JobServiceClient(url, accept_compression=(), send_compression=None)


async def throughput(url: str, key: str, count: int) -> dict[str, Any]:
    """Submit `count` `true` jobs at once; wall time until every one is final."""
    headers = {"authorization": f"Bearer {key}"}
    client = _client(url)
    spec = pb.JobSpec(kind="command", command=["true"])
    started = time.time()  # the wall clock: the jobs' finished_at is the server's
    submitted = await asyncio.gather(
        *(client.submit(pb.SubmitJobRequest(spec=spec), headers=headers) for _ in range(count))
    )
    submit_s = time.time() - started
    ids = {r.job.id for r in submitted}
    unfinished = pb.ListJobsRequest(states=[pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING], page_size=1)
    # One cheap question per poll (is any job left?), and seldom: the poll's cost to the
    # server is the benchmark's, not the queue's. The time is not the poll's: it ends at
    # the last job's finished_at (read below), on the same clock.
    while (await client.list(unfinished, headers=headers)).jobs:
        await asyncio.sleep(0.5)
    last_finished = 0.0
    states: dict[int, int] = {}
    token = ""
    while True:
        page = await client.list(
            pb.ListJobsRequest(page_size=1000, page_token=token), headers=headers
        )
        for job in page.jobs:
            if job.id in ids:
                states[job.state] = states.get(job.state, 0) + 1
                last_finished = max(last_finished, job.finished_at.ToNanoseconds() / 1e9)
        token = page.next_page_token
        if not token:
            break
    elapsed = last_finished - started
    return {
        "jobs": count,
        "seconds": round(elapsed, 2),
        "submit_seconds": round(submit_s, 2),
        "succeeded": states.get(pb.JOB_STATE_SUCCEEDED, 0),
        "jobs_per_s": round(count / elapsed, 1),
    }


async def latency(url: str, key: str, count: int, pace: float) -> list[float]:
    """ms from Submit to the first output chunk read back through StreamLogs."""
    headers = {"authorization": f"Bearer {key}"}
    client = _client(url)
    spec = pb.JobSpec(kind="command", command=["echo", "hi"])
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        job = (await client.submit(pb.SubmitJobRequest(spec=spec), headers=headers)).job
        request = pb.StreamJobLogsRequest(job_id=job.id, follow=True)
        async for message in client.stream_logs(request, headers=headers):
            if message.chunks:
                assert message.chunks[0].data == b"hi\n", message
                samples.append((time.perf_counter() - started) * 1000)
                break
        await asyncio.sleep(pace)
    return samples


async def oneshot_to_first_output(engine: Engine) -> float:
    """ms from the create call to the end of `true` as a one-shot sandbox."""
    start = time.perf_counter()
    sandbox = await engine.create(isolation="namespace", entrypoint=Entrypoint(["true"]))
    assert sandbox.entry is not None
    result = await sandbox.entry.wait()
    elapsed = (time.perf_counter() - start) * 1000
    assert result.ok, result
    await sandbox.destroy()
    return elapsed


async def engine_throughput(engine: Engine, count: int, concurrency: int, oneshot: bool) -> float:
    """create + `true` + destroy, `concurrency` at a time, no queue: sandboxes/s."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            if oneshot:
                await oneshot_to_first_output(engine)
                return
            sandbox = await engine.create(isolation="namespace")
            assert (await sandbox.run(["true"])).ok
            await sandbox.destroy()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return round(count / (time.perf_counter() - started), 1)


def _tmpfs_dir() -> Path | None:
    """A writable directory on tmpfs: /run where it is one (systemd hosts), else /dev/shm.

    Some hosts (this project's CI VMs among them) keep /run on the root disk; there every
    sandbox's footprint (a few directories and a small record, written and removed) costs
    disk metadata operations that a default host does not pay."""
    mounts = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mounts[fields[1]] = fields[2]
    for candidate in ("/run", "/dev/shm"):
        if mounts.get(candidate) == "tmpfs" and os.access(candidate, os.W_OK):
            return Path(candidate)
    return None


async def main(quick: bool, database_name: str = "sqlite") -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="corral-bench-jobs-", dir="/var/tmp"))
    root.chmod(0o755)
    # Sandboxes' runtime files on tmpfs, as with the default runtime dir (/run/corral as
    # root) on hosts whose /run is a tmpfs; the store stays on disk.
    tmpfs = _tmpfs_dir() or root
    runtime = Path(tempfile.mkdtemp(prefix="corral-bench-jobs-", dir=tmpfs))
    runtime.chmod(0o755)
    workers = Settings.from_env().job_workers
    report: dict[str, Any] = {
        "database": database_name,
        "job_workers": workers,
        "runtime_dir": str(tmpfs),
    }
    try:
        with (
            database(database_name) as database_url,
            running_server(
                root, "jobs", pool_size=0, runtime_dir=runtime, database_url=database_url
            ) as (url, key),
        ):
            await throughput(url, key, 20)  # warm up (agent install, caches, pool)
            await asyncio.sleep(0.5)
            lat = await latency(url, key, 30 if quick else 100, pace=0.05)
            await asyncio.sleep(0.5)
            report["throughput"] = await throughput(url, key, 100 if quick else 500)
        report["jobs_per_s"] = report["throughput"]["jobs_per_s"]
        report["queue_latency_ms"] = {**percentiles(lat, 50, 95, 99), "n": len(lat)}
        settings = Settings(runtime_dir=runtime / "engine", cgroup_parent=CGROUP_PARENT)
        samples = 20 if quick else 50
        async with Engine(settings) as engine:
            await create_to_first_output(engine)
            await oneshot_to_first_output(engine)
            first = [await create_to_first_output(engine) for _ in range(samples)]
            oneshot_first = [await oneshot_to_first_output(engine) for _ in range(samples)]
            count = 100 if quick else 200
            oneshot_rate = await engine_throughput(engine, count, workers, oneshot=True)
            agent_rate = await engine_throughput(engine, count, workers, oneshot=False)
        raw = raw_bwrap(20)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    report["engine"] = {
        "oneshot_per_s": oneshot_rate,
        "oneshot_create_to_exit_ms": {**percentiles(oneshot_first, 50, 99), "n": samples},
        "sandboxes_per_s": agent_rate,
        "create_to_first_output_ms": {**percentiles(first, 50, 99), "n": samples},
        "raw_bwrap_ms": percentiles(raw, 50),
    }
    # Under load the worker runs one-shot sandboxes: that is the engine's figure to beat.
    report["jobs_vs_raw_engine_throughput"] = round(report["jobs_per_s"] / oneshot_rate, 2)
    return report


if __name__ == "__main__":
    # --database is this benchmark's own option; run_cli reads the common ones.
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    options, sys.argv[1:] = own.parse_known_args()
    run_cli(__doc__, functools.partial(main, database_name=options.database))
