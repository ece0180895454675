"""Jobs end to end: real `corral server` and `corral worker` processes, real sandboxes,
a real store (SQLite, and PostgreSQL: `every_database`, `remote_server`). Workers and servers
are killed for real (SIGKILL, SIGTERM) and the queue must neither lose an acknowledged log
line nor run a job twice at once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.protobuf import json_format

from corral._state_enums import JOB_STATE_NUMBERS
from corral.config import Settings
from corral.jobs.callbacks import INTERNAL_FAILED
from corral.jobs.signing import verify
from corral.states import JOB_FINAL_STATES
from corral.v1 import jobs_pb2 as pb
from corral.v1.jobs_connect import JobServiceClient
from tests.conftest import (
    DATABASES,
    LiveServer,
    LiveWorker,
    database_url,
    start_server,
    start_worker,
)
from tests.kit.http import CallbackReceiver
from tests.kit.polling import until

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.usefixtures("sandbox_host"),
    pytest.mark.every_database,
]

FINAL = {JOB_STATE_NUMBERS[state] for state in JOB_FINAL_STATES}
LEASE = "2"


def state_name(state: int) -> str:
    return pb.JobState.Name(state)


def spec(data: dict[str, Any]) -> pb.JobSpec:
    """A JobSpec message from its JSON form, unchecked (the server is what checks)."""
    return json_format.ParseDict(data, pb.JobSpec())


# -- the JobService of a live server --------------------------------------------------------


class JobApi:
    """The generated Connect client of JobService, with a team's key."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key
        self.rpc = JobServiceClient(url, accept_compression=(), send_compression=None)
        self.headers = {"authorization": f"Bearer {key}"}

    async def submit(self, data: dict[str, Any], idempotency_key: str = "") -> pb.SubmitJobResponse:
        request = pb.SubmitJobRequest(spec=spec(data), idempotency_key=idempotency_key)
        return await self.rpc.submit(request, headers=self.headers, timeout_ms=30_000)

    async def get(self, job_id: str) -> pb.Job:
        reply = await self.rpc.get(pb.GetJobRequest(job_id=job_id), headers=self.headers)
        return reply.job

    async def list_page(self, **fields: Any) -> pb.ListJobsResponse:
        return await self.rpc.list(pb.ListJobsRequest(**fields), headers=self.headers)

    async def list_all(self, **fields: Any) -> list[pb.Job]:
        jobs: list[pb.Job] = []
        token = ""
        while True:
            page = await self.list_page(page_token=token, **fields)
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                return jobs

    async def cancel(self, job_id: str, reason: str = "") -> pb.Job:
        request = pb.CancelJobRequest(job_id=job_id, reason=reason)
        return (await self.rpc.cancel(request, headers=self.headers)).job

    async def retry(self, job_id: str) -> pb.Job:
        request = pb.RetryJobRequest(job_id=job_id)
        return (await self.rpc.retry(request, headers=self.headers)).job

    async def logs(self, job_id: str, offset: int = 0) -> list[pb.LogChunk]:
        request = pb.StreamJobLogsRequest(job_id=job_id, offset=offset)
        chunks: list[pb.LogChunk] = []
        async for message in self.rpc.stream_logs(request, headers=self.headers):
            chunks.extend(message.chunks)
        return chunks

    async def follow_logs(
        self, job_id: str, offset: int = 0
    ) -> AsyncGenerator[pb.StreamJobLogsResponse, None]:
        request = pb.StreamJobLogsRequest(job_id=job_id, offset=offset, follow=True)
        async for message in self.rpc.stream_logs(request, headers=self.headers):
            yield message

    async def first_logs(
        self, job_id: str, enough: Callable[[list[pb.LogChunk]], bool] = bool, timeout: float = 30
    ) -> list[pb.LogChunk]:
        """Follow the job's output until `enough` of it came (by default: any), then hang up."""
        seen: list[pb.LogChunk] = []
        stream = self.follow_logs(job_id)
        async with asyncio.timeout(timeout), contextlib.aclosing(stream):
            async for message in stream:
                seen.extend(message.chunks)
                if enough(seen):
                    break
        return seen

    async def output(self, job_id: str, attempt: int | None = None) -> bytes:
        chunks = await self.logs(job_id)
        return b"".join(c.data for c in chunks if attempt is None or c.attempt == attempt)

    async def events(self, job_id: str) -> list[pb.JobEvent]:
        request = pb.StreamJobEventsRequest(job_id=job_id)
        events: list[pb.JobEvent] = []
        async for message in self.rpc.stream_events(request, headers=self.headers):
            events.extend(message.events)
        return events

    async def wait(self, job_id: str, timeout: float = 30) -> pb.Job:
        """The job once it has ended, followed with StreamEvents(follow)."""
        request = pb.StreamJobEventsRequest(job_id=job_id, follow=True)
        final = None
        async with asyncio.timeout(timeout):
            async for message in self.rpc.stream_events(request, headers=self.headers):
                if message.HasField("final_state"):
                    final = message.final_state
        job = await self.get(job_id)
        assert final == job.state, (state_name(final or 0), job)
        return job

    async def wait_until(self, job_id: str, check: Any, timeout: float = 30) -> pb.Job:
        """Poll Get until `check(job)` holds."""

        async def there() -> pb.Job | None:
            job = await self.get(job_id)
            return job if check(job) else None

        return await until(there, f"job {job_id} to get there", timeout=timeout)

    async def aclose(self) -> None:
        await self.rpc.close()


@pytest.fixture
async def api(server: LiveServer) -> AsyncIterator[JobApi]:
    """A client of the session's server, on SQLite and on PostgreSQL."""
    client = JobApi(server.url, server.key)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def oneshot_server(settings: Settings) -> Iterator[LiveServer]:
    """A server whose workers keep no warm sandboxes: every job of one command runs in a
    one-shot sandbox (what a busy worker does)."""
    data_dir = settings.runtime_dir / f"oneshot-{secrets.token_hex(4)}"
    live = start_server(settings, data_dir, pool_size=0, extra_env={"CORRAL_JOB_POOL": "0"})
    yield live
    live.stop()


@pytest.fixture(params=["warm", "one-shot"])
async def run_api(
    request: pytest.FixtureRequest, oneshot_server: LiveServer
) -> AsyncIterator[JobApi]:
    """A client of a server running jobs in warm sandboxes when it can, or of one running
    them in one-shot sandboxes: the two must not differ in what a job sees or does. Both
    on SQLite: the subject is the sandboxes (the session's `server` is asked for only when
    warm, so these tests are not run once per database too)."""
    live: LiveServer = (
        request.getfixturevalue("server") if request.param == "warm" else oneshot_server
    )
    client = JobApi(live.url, live.key)
    yield client
    await client.aclose()


async def refused(call: Any, code: Code) -> str:
    with pytest.raises(ConnectError) as caught:
        await call
    assert caught.value.code == code, (caught.value.code, str(caught.value))
    message = str(caught.value)
    assert "Traceback" not in message
    return message


def data(event: pb.JobEvent) -> dict[str, Any]:
    """An event's data as plain values (numbers are floats, as in any JSON)."""
    return json_format.MessageToDict(event.data)


def step_events(events: list[pb.JobEvent]) -> list[tuple[str, int]]:
    return [(e.type, int(data(e)["step"])) for e in events if e.type.startswith("step_")]


def states(events: list[pb.JobEvent]) -> list[str]:
    return [e.state for e in events if e.type == "state"]


def processes_with(marker: bytes) -> list[int]:
    """Live host processes whose command line has `marker` (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def lines(count: int, pause: float, marker: str = "") -> str:
    """A script printing `line 1` … `line <count>`, one every `pause` seconds."""
    return f"for i in $(seq 1 {count}); do echo line $i; sleep {pause}{marker}; done"


def all_lines(count: int) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(1, count + 1))


# -- servers of their own -------------------------------------------------------------------


@dataclass
class Remote:
    """A server that runs no jobs itself (CORRAL_JOB_WORKERS=0): `corral worker`s do."""

    live: LiveServer
    api: JobApi
    workers: list[LiveWorker]

    def worker(self, **env: str) -> LiveWorker:
        worker = start_worker(self.live, **{"CORRAL_JOB_WORKERS": "1", **env})
        self.workers.append(worker)
        return worker


@pytest.fixture(scope="module", params=DATABASES)
def remote_server(settings: Settings, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """A server and its workers' store: on SQLite, and on PostgreSQL (workers in other
    processes claiming there, as in a deployment)."""
    live = start_server(
        settings,
        settings.runtime_dir / f"remote-{secrets.token_hex(4)}",
        pool_size=0,
        extra_env={
            "CORRAL_JOB_WORKERS": "0",
            "CORRAL_JOB_LEASE": LEASE,
            "CORRAL_JOB_LOG_LIMIT": "65536",
            "CORRAL_DATABASE_URL": database_url(request),
        },
    )
    yield live
    live.stop()


@pytest.fixture
async def remote(remote_server: LiveServer) -> AsyncIterator[Remote]:
    client = JobApi(remote_server.url, remote_server.key)
    remote = Remote(remote_server, client, [])
    try:
        yield remote
    finally:
        # Nothing of this test is left for the next one's workers.
        for job in await client.list_all(states=[pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING]):
            await client.cancel(job.id, "test over")
        for worker in remote.workers:
            worker.stop(signal.SIGKILL)
        await client.aclose()


# -- workflows ------------------------------------------------------------------------------


async def test_a_workflow_stops_at_its_first_failing_step(api: JobApi) -> None:
    submitted = await api.submit(
        {
            "kind": "workflow",
            "steps": [{"run": "echo first"}, {"run": "exit 3"}, {"run": "echo third"}],
        }
    )
    assert submitted.created and submitted.job.state == pb.JOB_STATE_QUEUED
    job = await api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_FAILED, job
    assert job.exit_code == 3 and job.attempt == 1 and job.max_attempts == 1
    assert "exited with code 3" in job.state_reason
    events = await api.events(job.id)
    assert step_events(events) == [
        ("step_start", 0),
        ("step_end", 0),
        ("step_start", 1),
        ("step_end", 1),
    ]
    ends = [e for e in events if e.type == "step_end"]
    assert [data(e)["exit_code"] for e in ends] == [0, 3]
    assert all(data(e)["duration_ms"] >= 0 for e in ends)
    assert [data(e)["name"] for e in ends] == ["step 1", "step 2"]
    assert states(events) == ["queued", "running", "failed"]
    assert [e.seq for e in events] == list(range(len(events)))
    chunks = await api.logs(job.id)
    assert b"".join(c.data for c in chunks) == b"first\n"
    assert {(c.step, c.stream, c.attempt) for c in chunks} == {(0, pb.LOG_STREAM_STDOUT, 1)}


async def test_a_step_that_may_fail_lets_the_workflow_go_on(api: JobApi) -> None:
    submitted = await api.submit(
        {
            "kind": "workflow",
            "steps": [
                {"run": "echo first"},
                {"name": "flaky", "run": "echo oops >&2; exit 3", "continueOnError": True},
                {"command": ["sh", "-c", "echo third"]},
            ],
        }
    )
    job = await api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert job.exit_code == 0
    events = await api.events(job.id)
    assert [s for t, s in step_events(events) if t == "step_end"] == [0, 1, 2]
    ends = {int(data(e)["step"]): e for e in events if e.type == "step_end"}
    assert data(ends[1])["exit_code"] == 3 and data(ends[1])["name"] == "flaky"
    chunks = await api.logs(job.id)
    assert [(c.step, c.stream, c.data) for c in chunks] == [
        (0, pb.LOG_STREAM_STDOUT, b"first\n"),
        (1, pb.LOG_STREAM_STDERR, b"oops\n"),
        (2, pb.LOG_STREAM_STDOUT, b"third\n"),
    ]


async def test_without_warm_sandboxes_a_command_runs_one_shot_and_a_workflow_gets_an_agent(
    oneshot_server: LiveServer,
) -> None:
    api = JobApi(oneshot_server.url, oneshot_server.key)
    try:
        alone = await api.submit({"command": ["cat", "/proc/1/comm"]})
        steps = await api.submit({"kind": "workflow", "steps": [{"run": "cat /proc/1/comm"}]})
        for submitted, init in ((alone, b"bwrap\n"), (steps, b"python3\n")):
            job = await api.wait(submitted.job.id)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job
            assert await api.output(job.id) == init  # pid 1: bwrap's init, or the agent
    finally:
        await api.aclose()


async def test_files_env_and_workdir_reach_the_job(run_api: JobApi) -> None:
    submitted = await run_api.submit(
        {
            "kind": "code",
            "language": "python",
            "code": "import os; print(open('data/in.txt').read(), os.environ['GREETING'], "
            "os.getcwd(), oct(os.stat('run.sh').st_mode & 0o777))",
            "env": {"GREETING": "hi"},
            "workdir": "/workspace/job",
            "files": [
                {"path": "data/in.txt", "content": base64.b64encode(b"from a file").decode()},
                {"path": "run.sh", "content": "", "mode": 0o750},
            ],
        }
    )
    job = await run_api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert await run_api.output(job.id) == b"from a file hi /workspace/job 0o750\n"


async def test_a_workdir_without_files_is_made(run_api: JobApi) -> None:
    submitted = await run_api.submit({"command": ["pwd"], "workdir": "/tmp/empty-workdir"})
    job = await run_api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert await run_api.output(job.id) == b"/tmp/empty-workdir\n"


# -- cancel ---------------------------------------------------------------------------------


async def test_cancel_kills_every_process_of_a_running_job(run_api: JobApi) -> None:
    marker = f"60.{secrets.randbelow(10**6):06d}"
    script = f"trap '' TERM INT HUP; sleep {marker} & echo started; sleep {marker}"
    submitted = await run_api.submit({"run": script})
    job_id = submitted.job.id
    await run_api.first_logs(job_id, lambda seen: b"started" in b"".join(c.data for c in seen))
    assert len(processes_with(marker.encode())) >= 2  # the shell, its two sleeps
    started = time.monotonic()
    asked = await run_api.cancel(job_id, "changed my mind")
    # This server's own worker stops it at once: Cancel answers with the stopped job.
    assert asked.id == job_id and asked.state == pb.JOB_STATE_CANCELED, asked
    job = await run_api.wait(job_id, timeout=10)
    assert time.monotonic() - started < 5
    assert job.state == pb.JOB_STATE_CANCELED, job
    assert "changed my mind" in job.state_reason
    assert processes_with(marker.encode()) == []
    # Canceling a finished job changes nothing; Retry runs it again.
    again = await run_api.cancel(job_id, "twice")
    assert again.state == pb.JOB_STATE_CANCELED and again.state_reason == job.state_reason
    events = await run_api.events(job_id)
    assert states(events) == ["queued", "running", "canceled"]


async def test_a_process_that_leaves_the_job_dies_with_its_sandbox(run_api: JobApi) -> None:
    """A daemonized child (new session, double fork, signals ignored) outlives its job's
    command, but not the job."""
    marker = f"60.{secrets.randbelow(10**6):06d}"
    script = (
        f"(trap '' TERM HUP INT; setsid sleep {marker} </dev/null >/dev/null 2>&1 &) ; "
        f"nohup sleep {marker} </dev/null >/dev/null 2>&1 & echo left"
    )
    submitted = await run_api.submit({"run": script})
    job = await run_api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert await run_api.output(job.id) == b"left\n"
    assert processes_with(marker.encode()) == []


async def test_output_is_kept_byte_for_byte_on_both_streams(run_api: JobApi) -> None:
    script = r"printf 'a\377\000b'; printf 'err\376' >&2; printf '\n'"
    submitted = await run_api.submit({"run": script})
    job = await run_api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    chunks = await run_api.logs(job.id)
    out = b"".join(c.data for c in chunks if c.stream == pb.LOG_STREAM_STDOUT)
    err = b"".join(c.data for c in chunks if c.stream == pb.LOG_STREAM_STDERR)
    assert (out, err) == (b"a\xff\x00b\n", b"err\xfe")
    assert job.log_bytes == len(out) + len(err)


# -- timeouts and retries -------------------------------------------------------------------


async def test_a_job_timeout_stops_it(run_api: JobApi) -> None:
    marker = f"30.{secrets.randbelow(10**6):06d}"
    started = time.monotonic()
    submitted = await run_api.submit({"command": ["sleep", marker], "timeoutSeconds": 1})
    job = await run_api.wait(submitted.job.id)
    assert 1 <= time.monotonic() - started < 4
    assert job.state == pb.JOB_STATE_TIMED_OUT, job
    assert "timed out" in job.state_reason
    assert processes_with(marker.encode()) == []


async def test_a_step_timeout_fails_the_workflow_at_that_step(api: JobApi) -> None:
    submitted = await api.submit(
        {
            "kind": "workflow",
            "timeoutSeconds": 60,
            "steps": [
                {"run": "echo before"},
                {"name": "slow", "command": ["sleep", "30"], "timeoutSeconds": 1},
                {"run": "echo after"},
            ],
        }
    )
    started = time.monotonic()
    job = await api.wait(submitted.job.id)
    assert time.monotonic() - started < 5
    assert job.state == pb.JOB_STATE_TIMED_OUT, job
    assert "slow" in job.state_reason and "1s" in job.state_reason
    events = await api.events(job.id)
    assert [s for t, s in step_events(events) if t == "step_end"] == [0, 1]
    (slow,) = [e for e in events if e.type == "step_end" and data(e)["step"] == 1]
    assert data(slow)["state"] == "timed_out"
    assert 900 <= data(slow)["duration_ms"] < 4000
    assert await api.output(job.id) == b"before\n"


async def test_retries_run_a_failing_job_again_then_give_up(run_api: JobApi) -> None:
    submitted = await run_api.submit(
        {"run": "echo try; exit 1", "retries": 2, "retryBackoffSeconds": 0.1}
    )
    assert submitted.job.max_attempts == 3
    job = await run_api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_FAILED, job
    assert job.attempt == 3 and job.exit_code == 1
    events = await run_api.events(job.id)
    retries = [e for e in events if e.type == "retry_scheduled"]
    assert [e.attempt for e in retries] == [1, 2]
    queued = [e.reason for e in events if e.state == "queued"][1:]
    assert queued == ["retry 1 of 2", "retry 2 of 2"]
    assert states(events) == ["queued"] + ["running", "queued"] * 2 + ["running", "failed"]
    chunks = await run_api.logs(job.id)
    assert [(c.attempt, c.data) for c in chunks] == [(1, b"try\n"), (2, b"try\n"), (3, b"try\n")]


async def test_retry_runs_a_finished_job_again(run_api: JobApi) -> None:
    submitted = await run_api.submit({"command": ["sh", "-c", "echo run; exit 4"]})
    first = await run_api.wait(submitted.job.id)
    assert first.state == pb.JOB_STATE_FAILED and first.attempt == 1
    retried = await run_api.retry(first.id)
    assert retried.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    second = await run_api.wait(first.id)
    assert second.state == pb.JOB_STATE_FAILED and second.attempt == 2 and second.exit_code == 4
    assert await run_api.output(first.id) == b"run\nrun\n"
    assert [c.attempt for c in await run_api.logs(first.id)] == [1, 2]


async def test_only_a_finished_job_can_be_retried(api: JobApi) -> None:
    submitted = await api.submit({"command": ["sleep", "30"]})
    await api.wait_until(submitted.job.id, lambda j: j.state == pb.JOB_STATE_RUNNING)
    message = await refused(api.retry(submitted.job.id), Code.INVALID_ARGUMENT)
    assert "running" in message
    await api.cancel(submitted.job.id)
    assert (await api.wait(submitted.job.id)).state == pb.JOB_STATE_CANCELED


# -- workers and servers that die -----------------------------------------------------------


@pytest.mark.parametrize("pool", ["1", "0"], ids=["warm", "one-shot"])
async def test_a_job_whose_worker_is_killed_runs_again_and_keeps_its_logs(
    remote: Remote, pool: str
) -> None:
    remote.worker(CORRAL_JOB_POOL=pool)
    api = remote.api
    marker = f"{secrets.randbelow(10**6):06d}"
    stale = b"sleep\x00600." + marker.encode()
    # Attempt 1 prints a little, then waits until its worker is killed.
    first_only = (
        f'if [ "$CORRAL_JOB_ATTEMPT" = 1 ]; then {lines(3, 0.05)}; exec sleep 600.{marker}; fi'
    )
    submitted = await api.submit({"run": f"{first_only}\n{lines(20, 0.05)}"})
    job_id = submitted.job.id
    seen = await api.first_logs(job_id, lambda seen: b"line 3" in b"".join(c.data for c in seen))
    running = await api.get(job_id)
    assert running.state == pb.JOB_STATE_RUNNING and running.attempt == 1
    remote.workers[0].stop(signal.SIGKILL)
    await until(lambda: processes_with(stale) == [], "the killed worker's sandbox to die")
    remote.worker(CORRAL_JOB_POOL=pool)
    job = await api.wait(job_id, timeout=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert job.attempt == 2
    chunks = await api.logs(job_id)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    # Every chunk a reader was given before the kill is still there, unchanged.
    assert [(c.seq, c.attempt, c.data) for c in chunks[: len(seen)]] == [
        (c.seq, c.attempt, c.data) for c in seen
    ]
    assert all(c.attempt == 1 for c in seen)
    assert b"".join(c.data for c in chunks if c.attempt == 2) == all_lines(20)
    events = await api.events(job_id)
    requeued = [e for e in events if e.type == "state" and e.state == "queued"][1:]
    assert len(requeued) == 1 and "stopped heartbeating" in requeued[0].reason
    assert job.max_attempts == 2  # the lost worker did not spend a retry


@pytest.mark.parametrize("pool", ["1", "0"], ids=["warm", "one-shot"])
async def test_a_worker_stopped_by_sigterm_gives_its_job_back(remote: Remote, pool: str) -> None:
    first = remote.worker(CORRAL_JOB_POOL=pool)
    api = remote.api
    digits = f"{secrets.randbelow(10**6):06d}"
    marker = f"0.2{digits}"  # what its sleeps' command lines hold
    submitted = await api.submit({"run": lines(10, 0.2, digits)})
    job_id = submitted.job.id
    await api.first_logs(job_id)
    started = time.monotonic()
    assert first.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    job = await api.get(job_id)
    # Given back at once (not when the lease runs out), and not failed.
    assert job.state == pb.JOB_STATE_QUEUED, job
    assert "shut down" in job.state_reason
    assert job.attempt == 1 and job.max_attempts == 2
    assert processes_with(marker.encode()) == []  # its sandbox went with it
    remote.worker(CORRAL_JOB_POOL=pool)
    job = await api.wait(job_id, timeout=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempt == 2
    assert states(await api.events(job_id)) == [
        "queued",
        "running",
        "queued",
        "running",
        "succeeded",
    ]
    assert await api.output(job_id, attempt=2) == all_lines(10)


async def test_a_worker_back_from_the_dead_cannot_overwrite_its_successor(
    remote: Remote,
) -> None:
    """A worker frozen past its lease (SIGSTOP) loses the job to another; once thawed it
    writes nothing more and kills its stale attempt."""
    frozen = remote.worker()
    api = remote.api
    marker = f"{secrets.randbelow(10**6):06d}"
    stale = b"sleep\x00600." + marker.encode()  # the exec'd sleep's argv, not a script
    # The first attempt never ends by itself, so it is still running when the second
    # starts however slow the host is; the second prints every line.
    first_only = f'if [ "$CORRAL_JOB_ATTEMPT" = 1 ]; then echo line 1; exec sleep 600.{marker}; fi'
    submitted = await api.submit({"run": f"{first_only}\n{lines(40, 0.05, marker)}"})
    job_id = submitted.job.id
    await api.first_logs(job_id)
    await until(lambda: processes_with(stale), "attempt 1 to run")
    assert len(processes_with(stale)) == 1
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        remote.worker()
        await api.wait_until(
            job_id, lambda j: j.attempt == 2 and j.state == pb.JOB_STATE_RUNNING, timeout=30
        )
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    await until(lambda: processes_with(stale) == [], "the thawed worker to stop its attempt")
    job = await api.wait(job_id, timeout=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempt == 2, job
    assert frozen.process.poll() is None  # it lives on, and took nothing back
    chunks = await api.logs(job_id)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    attempts = [c.attempt for c in chunks]
    assert attempts == sorted(attempts)  # no late output of attempt 1 among attempt 2's
    assert b"".join(c.data for c in chunks if c.attempt == 2) == all_lines(40)
    events = await api.events(job_id)
    assert states(events) == ["queued", "running", "queued", "running", "succeeded"]
    requeue = [e.seq for e in events if e.state == "queued"][1]
    assert all(e.attempt == 2 for e in events if e.seq > requeue)


async def test_a_cancel_reaches_a_job_on_another_process_worker(remote: Remote) -> None:
    remote.worker()
    api = remote.api
    marker = f"60.{secrets.randbelow(10**6):06d}"
    submitted = await api.submit({"run": f"echo started; sleep {marker}"})
    await api.first_logs(submitted.job.id)
    started = time.monotonic()
    await api.cancel(submitted.job.id, "from afar")
    job = await api.wait(submitted.job.id, timeout=15)
    assert time.monotonic() - started < 4  # the next heartbeat (a third of the lease)
    assert job.state == pb.JOB_STATE_CANCELED and "from afar" in job.state_reason
    assert processes_with(marker.encode()) == []


async def test_output_past_the_log_limit_is_dropped(remote: Remote) -> None:
    remote.worker()
    api = remote.api
    submitted = await api.submit({"run": "yes | head -c 1000000"})
    job = await api.wait(submitted.job.id, timeout=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job
    assert job.log_limit_bytes == 65536
    assert job.log_bytes == 65536 and job.log_truncated
    output = await api.output(job.id)
    assert output == b"y\n" * 32768
    truncated = [e for e in await api.events(job.id) if e.type == "log_truncated"]
    assert len(truncated) == 1 and data(truncated[0])["limit_bytes"] == 65536


async def test_a_queued_job_is_canceled_at_once(remote: Remote) -> None:
    """No worker runs here: the job stays queued until canceled."""
    api = remote.api
    submitted = await api.submit({"command": ["true"]})
    await asyncio.sleep(0.5)
    assert (await api.get(submitted.job.id)).state == pb.JOB_STATE_QUEUED
    job = await api.cancel(submitted.job.id, "never mind")
    assert job.state == pb.JOB_STATE_CANCELED and job.attempt == 0
    assert job.state_reason == "canceled: never mind"


async def test_a_follow_whose_client_went_away_ends_on_the_server(settings: Settings) -> None:
    """connect-python notices a gone client only when it sends: a follow of a job with
    nothing new would keep its handler, and the server's shutdown, waiting."""
    data_dir = settings.runtime_dir / f"gone-{secrets.token_hex(4)}"
    live = start_server(settings, data_dir, pool_size=0, extra_env={"CORRAL_JOB_WORKERS": "0"})
    try:
        api = JobApi(live.url, live.key)
        job = (await api.submit({"command": ["true"]})).job  # no worker: it stays queued
        request = pb.StreamJobEventsRequest(job_id=job.id, follow=True)
        stream = cast(
            AsyncGenerator[pb.StreamJobEventsResponse, None],
            api.rpc.stream_events(request, headers=api.headers),
        )
        assert (await anext(stream)).events  # the "queued" event: the follow is open
        await stream.aclose()  # the client hangs up
        await api.aclose()
        started = time.monotonic()
        assert live.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5  # not the 10 s shutdown grace
    finally:
        live.stop(signal.SIGKILL)


async def test_a_log_follower_survives_a_server_killed_mid_job(settings: Settings) -> None:
    data_dir = settings.runtime_dir / f"killed-{secrets.token_hex(4)}"
    env = {"CORRAL_JOB_WORKERS": "1", "CORRAL_JOB_LEASE": LEASE}
    first = start_server(settings, data_dir, pool_size=0, extra_env=env)
    second: LiveServer | None = None
    try:
        api = JobApi(first.url, first.key)
        submitted = await api.submit({"run": lines(25, 0.15)})
        job_id = submitted.job.id
        got: list[pb.LogChunk] = []
        broke = False
        try:
            async with asyncio.timeout(30):
                async for message in api.follow_logs(job_id):
                    got.extend(message.chunks)
                    if len(got) >= 3 and first.process.poll() is None:
                        first.stop(signal.SIGKILL)  # the stream is open: it must break
        except ConnectError:
            broke = True
        await api.aclose()
        assert broke and len(got) >= 3
        before = len(got)

        second = await asyncio.to_thread(
            start_server, settings, data_dir, pool_size=0, extra_env=env
        )
        api = JobApi(second.url, second.key)
        final = None
        async with asyncio.timeout(60):
            async for message in api.follow_logs(job_id, offset=got[-1].seq + 1):
                got.extend(message.chunks)
                if message.HasField("final_state"):
                    final = message.final_state
        assert final == pb.JOB_STATE_SUCCEEDED
        job = await api.get(job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempt == 2
        # Nothing lost or repeated across the reconnect.
        assert [c.seq for c in got] == list(range(len(got)))
        stored = await api.logs(job_id)
        assert [(c.seq, c.data) for c in stored] == [(c.seq, c.data) for c in got]
        assert all(c.attempt == 1 for c in got[:before])
        assert b"".join(c.data for c in got if c.attempt == 2) == all_lines(25)
        await api.aclose()
    finally:
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()


# -- many at once ---------------------------------------------------------------------------


async def test_two_hundred_jobs_submitted_at_once_all_finish(api: JobApi) -> None:
    batch = secrets.token_hex(4)
    replies = await asyncio.gather(
        *(api.submit({"command": ["true"], "labels": {"batch": batch}}) for _ in range(200))
    )
    ids = {r.job.id for r in replies}
    assert len(ids) == 200 and all(r.created for r in replies)

    async def all_over() -> list[pb.Job] | None:
        done = await api.list_all(labels={"batch": batch}, states=sorted(FINAL), page_size=1000)
        return done if len(done) == 200 else None

    done = await until(all_over, "the 200 jobs to end", timeout=90, interval=0.5)
    assert {j.id for j in done} == ids
    assert {state_name(j.state) for j in done} == {"JOB_STATE_SUCCEEDED"}
    # Pages of 30, newest first, every job once.
    paged = await api.list_all(
        labels={"batch": batch}, states=[pb.JOB_STATE_SUCCEEDED], page_size=30
    )
    assert [j.id for j in paged] == [j.id for j in done]
    assert len({j.id for j in paged}) == 200
    created = [j.created_at.ToNanoseconds() for j in paged]
    assert created == sorted(created, reverse=True)
    assert await api.list_all(labels={"batch": batch}, states=[pb.JOB_STATE_FAILED]) == []


# -- callbacks ------------------------------------------------------------------------------


async def test_callbacks_are_signed_retried_and_delivered(
    api: JobApi, receiver: CallbackReceiver
) -> None:
    receiver.fail_first = 2
    submitted = await api.submit(
        {
            "kind": "workflow",
            "steps": [{"run": "echo a"}, {"run": "echo b"}],
            "callbackUrl": receiver.url,
        }
    )
    secret = submitted.callback_secret
    assert len(secret) >= 32
    job = await api.wait(submitted.job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED
    job = await api.wait_until(
        job.id, lambda j: j.callback.pending == 0 and j.callback.delivered > 0, timeout=30
    )
    assert job.callback.url == receiver.url and job.callback.failed == 0
    assert secret.encode() not in job.SerializeToString()  # given once, in Submit only
    listed = await api.list_page(labels={}, page_size=1000)
    assert secret.encode() not in listed.SerializeToString()
    got = receiver.requests()
    for r in got:
        assert verify(secret, r.headers["x-corral-signature"], r.body), r.headers
        assert not verify("not-the-secret", r.headers["x-corral-signature"], r.body)
        assert "authorization" not in r.headers
        assert r.headers["x-corral-job"] == job.id
    ok = [r.payload for r in got if r.status < 300]
    kinds = [p["type"] for p in ok]
    assert kinds.count("done") == 1 and kinds.count("step_end") == 2 and "error" not in kinds
    assert job.callback.delivered == len(ok)
    (done,) = [p for p in ok if p["type"] == "done"]
    assert done["job_id"] == job.id and done["state"] == "succeeded"
    # Each critical delivery failed twice before it got through.
    critical = {r.delivery for r in got if r.event in ("done", "step_end")}
    assert sorted(n for delivery, n in receiver.tries().items() if delivery in critical) == [3] * 3
    # The receiver is internal (allowed on loopback): the tenant is not told how it failed.
    assert job.callback.last_error == INTERNAL_FAILED


# -- what the server refuses ----------------------------------------------------------------


@pytest.fixture(scope="module")
def team_key(server: LiveServer) -> str:
    """The key of a team of this module's own, whose List shows only what it queued."""
    return server.new_team(f"jobs-{secrets.token_hex(3)}")


@pytest.fixture
async def team_api(server: LiveServer, team_key: str) -> AsyncIterator[JobApi]:
    client = JobApi(server.url, team_key)
    yield client
    await client.aclose()


async def count(api: JobApi) -> int:
    return len(await api.list_all(page_size=1000))


BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"kind": "lambda", "command": ["x"]}, "unknown kind 'lambda'"),
    ({"kind": "agent"}, "not built yet"),
    ({"kind": "command"}, "needs 'command'"),
    ({"kind": "command", "command": ["x"], "run": "y"}, "'run'"),
    ({}, "kind"),
    ({"command": ["x"], "env": {f"V{i}": "x" for i in range(300)}}, "env"),
    ({"command": ["x"], "env": {"BIG": "x" * 100_000}}, "env"),
    ({"command": ["x"], "files": [{"path": "../../etc/cron.d/x"}]}, "files[0].path"),
    ({"command": ["x"], "priority": -5000}, "priority"),
    ({"command": ["x"], "timeoutSeconds": 10**6}, "timeout"),
    ({"command": ["x"], "retries": 1000}, "retries"),
    ({"command": ["x"], "retryBackoffSeconds": -1}, "retry_backoff"),
    ({"command": ["x"], "limits": {"memoryMib": 10**9}}, "memory_mib"),
    ({"command": ["x"], "workdir": "relative/dir"}, "workdir"),
    ({"command": ["x"], "callbackUrl": "file:///etc/passwd"}, "callback_url"),
    ({"command": ["x"], "isolation": "docker"}, "isolation"),
    ({"steps": [{"run": "a", "code": "b"}]}, "steps[0]"),
    ({"steps": [{"run": "a", "shell": "zsh"}]}, "steps[0].shell"),
]


@pytest.mark.parametrize(("data", "named"), BAD_SPECS)
async def test_a_bad_spec_is_refused_naming_the_problem(
    team_api: JobApi, data: dict[str, Any], named: str
) -> None:
    before = await count(team_api)
    message = await refused(team_api.submit(data), Code.INVALID_ARGUMENT)
    assert named in message
    assert await count(team_api) == before


async def test_a_template_the_team_does_not_have_is_not_found(team_api: JobApi) -> None:
    """Names are per team: one the team lacks is not found, whoever else has one."""
    before = await count(team_api)
    call = team_api.submit({"command": ["x"], "template": "no-such-template"})
    assert "no template 'no-such-template'" in await refused(call, Code.NOT_FOUND)
    assert await count(team_api) == before


async def test_a_submit_without_a_spec_is_refused(team_api: JobApi) -> None:
    before = await count(team_api)
    call = team_api.rpc.submit(pb.SubmitJobRequest(), headers=team_api.headers)
    assert "spec" in await refused(call, Code.INVALID_ARGUMENT)
    assert await count(team_api) == before


def post_json(server: LiveServer, method: str, body: Any, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}/corral.v1.JobService/{method}",
        content=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {key or server.key}",
        },
        timeout=30,
    )


async def test_an_unknown_json_field_is_named(server: LiveServer, team_api: JobApi) -> None:
    before = await count(team_api)
    response = post_json(server, "Submit", {"spec": {"kind": "command", "bogus": 1}}, team_api.key)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "invalid_argument" and "bogus" in body["message"], body
    assert await count(team_api) == before
    # A negative number where the API has an unsigned one is refused too.
    response = post_json(
        server, "Submit", {"spec": {"command": ["x"], "timeoutSeconds": -1}}, team_api.key
    )
    assert response.status_code == 400, response.text
    assert await count(team_api) == before


# A tier the workers' host lacks: tests/test_tier_errors.py (a host without its commands).


async def test_an_idempotency_key_returns_the_first_job(team_api: JobApi) -> None:
    before = await count(team_api)
    first = await team_api.submit({"command": ["true"]}, idempotency_key="deploy-42")
    second = await team_api.submit({"command": ["true"]}, idempotency_key="deploy-42")
    assert first.created and not second.created
    assert second.job.id == first.job.id
    assert list(second.job.spec.command) == ["true"]
    assert second.job.idempotency_key == "deploy-42"
    hooked = await team_api.submit(
        {"command": ["true"], "callbackUrl": "http://127.0.0.1:9/"}, idempotency_key="hook"
    )
    again = await team_api.submit(
        {"command": ["true"], "callbackUrl": "http://127.0.0.1:9/"}, idempotency_key="hook"
    )
    assert hooked.callback_secret and again.callback_secret == ""  # only ever given once
    racing = await asyncio.gather(
        *(team_api.submit({"command": ["true"]}, idempotency_key="race") for _ in range(10))
    )
    assert len({r.job.id for r in racing}) == 1
    assert sum(r.created for r in racing) == 1
    assert await count(team_api) == before + 3
    message = await refused(
        team_api.submit({"command": ["true"]}, idempotency_key="k" * 300), Code.INVALID_ARGUMENT
    )
    assert "idempotency_key" in message


async def test_another_team_cannot_see_or_touch_a_job(api: JobApi, team_api: JobApi) -> None:
    submitted = await api.submit({"command": ["true"]})
    job_id = submitted.job.id
    for call in (
        team_api.get(job_id),
        team_api.cancel(job_id),
        team_api.retry(job_id),
        team_api.logs(job_id),
        team_api.events(job_id),
    ):
        assert job_id in await refused(call, Code.NOT_FOUND)
    assert job_id not in {j.id for j in await team_api.list_all()}
    assert (await api.wait(job_id)).state == pb.JOB_STATE_SUCCEEDED
    await refused(api.get("j-does-not-exist"), Code.NOT_FOUND)
    await refused(api.get(""), Code.NOT_FOUND)


async def test_bad_list_and_stream_requests_are_refused(api: JobApi) -> None:
    await refused(api.list_page(page_size=5000), Code.INVALID_ARGUMENT)
    await refused(api.list_page(page_size=-1), Code.INVALID_ARGUMENT)
    await refused(api.list_page(page_token="not-a-token"), Code.INVALID_ARGUMENT)
    await refused(api.list_page(states=[99]), Code.INVALID_ARGUMENT)
    await refused(api.list_page(labels={'a"b': "c"}), Code.INVALID_ARGUMENT)
    submitted = await api.submit({"command": ["true"]})
    await refused(api.logs(submitted.job.id, offset=-1), Code.INVALID_ARGUMENT)


def test_unauthenticated_calls_are_refused(server: LiveServer) -> None:
    response = post_json(server, "List", {}, key="not-a-key")
    assert response.status_code == 401, response.text
    response = httpx.post(
        f"{server.url}/corral.v1.JobService/List",
        content=b"{}",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 401, response.text


async def test_a_job_over_the_teams_memory_quota_is_refused(team_api: JobApi) -> None:
    """A sandbox asking for more memory than the team's max_memory_mib (8192 by default)
    is refused with RESOURCE_EXHAUSTED; a job's sandbox must be held to the same quota."""
    before = await count(team_api)
    message = await refused(
        team_api.submit({"command": ["true"], "limits": {"memoryMib": 8193}}),
        Code.RESOURCE_EXHAUSTED,
    )
    assert "max_memory_mib" in message
    assert await count(team_api) == before


async def test_a_job_asking_more_than_the_host_has_is_refused_at_submit(team_api: JobApi) -> None:
    before = await count(team_api)
    submitted = None
    try:
        submitted = await team_api.submit({"command": ["true"], "limits": {"memoryMib": 1_000_000}})
    except ConnectError as exc:
        assert exc.code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED), exc
        assert await count(team_api) == before
        return
    job = await team_api.wait(submitted.job.id)
    raise AssertionError(f"queued, then: {state_name(job.state)}: {job.state_reason}")
