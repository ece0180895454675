"""A job the host has no memory for yet waits in the queue (issue 9, finding 2, for jobs).

Host admission (`corral.isolation.admission`) refuses a sandbox whose memory limit does
not fit beside the live ones. For a job that is the host's condition, not the job's
fault: workers claim only jobs that fit (tests/test_job_room.py), so it stays queued; and
should the host still refuse its sandbox (another process took the room after the
claim), it goes back to the queue without spending an attempt (nor counting as a lost
worker), says why, and is claimed again a little later, until room frees up. A job whose
sandbox could never fit, even on an idle host, is refused at submit, or failed at once
by a worker that finds it queued.

On real SQLite files through the store; then with a real server, real workers and real
sandboxes on a host whose capacity is made tiny (CORRAL_MEMORY_OVERCOMMIT).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest
from connectrpc.code import Code

from corral import job_lifecycle
from corral.config import Settings
from corral.isolation import Engine
from corral.jobs.queue import JobQueue
from corral.jobs.spec import JobSpec
from corral.jobs.worker import Worker
from corral.store import Store, Team
from corral.store.job_rows import JobRow
from corral.v1 import jobs_pb2 as pb
from tests.conftest import (
    ONE_JOB_MIB,
    LiveServer,
    overcommit_for,
    private_runtime,
    require_backend,
    start_server,
)
from tests.kit.polling import until
from tests.test_job_store import attempt_of, claim_one, event_types, job, submit
from tests.test_jobs import JobApi, refused

# -- the store ------------------------------------------------------------------------------


@pytest.fixture
def team(store: Store) -> Team:
    return store.create_team("acme")


def test_an_attempt_that_never_started_is_taken_back(store: Store, team: Team) -> None:
    row = submit(store, team, max_attempts=2)
    attempt = attempt_of(claim_one(store))
    later = datetime.now(UTC) + timedelta(seconds=30)
    released = store.release_attempt(
        attempt, "waiting for host memory: full", started=False, run_after=later, data={"n": 1}
    )
    assert released is not None and released == job(store, row.id)
    assert released.state == "queued" and released.state_reason == "waiting for host memory: full"
    # Neither an attempt, nor a retry, nor a lost worker spent.
    assert (released.attempt, released.max_attempts, released.lost_count) == (0, 2, 0)
    assert released.run_after == later
    assert store.claim_jobs("w2", ("auto",), 1, 60) == []  # not before run_after
    assert event_types(store, row.id)[-3:] == [
        ("state", "running"),
        ("requeued", None),
        ("state", "queued"),
    ]
    (requeued,) = [e for e in store.job_events(row.id) if e.type == "requeued"]
    assert requeued.reason == "waiting for host memory: full" and requeued.data == {"n": 1}
    assert requeued.attempt == 1
    assert store.count_events(row.id, "requeued") == 1


def test_make_due_lets_a_waiting_job_be_claimed_now(store: Store, team: Team) -> None:
    row = submit(store, team, run_after=datetime.now(UTC) + timedelta(hours=1))
    other = submit(store, team)
    running = claim_one(store)
    assert running.id == other.id
    store.make_due(row.id)
    store.make_due(running.id)  # not queued: unchanged
    assert job(store, running.id) == running
    assert claim_one(store).id == row.id


def test_a_cancel_waiting_wins_over_the_requeue(store: Store, team: Team) -> None:
    row = submit(store, team)
    attempt = attempt_of(claim_one(store))
    store.cancel_job(row.id, "no longer needed")
    released = store.release_attempt(attempt, "waiting for host memory", started=False)
    assert released is not None and released.state == "canceled"
    assert released.attempt == 0 and released.finished_at is not None
    assert store.count_events(row.id, "requeued") == 0


# -- a real server on a tiny host -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(settings: Settings) -> Iterator[LiveServer]:
    """Two worker slots, no warm sandboxes, room for one 512 MiB sandbox at a time."""
    require_backend(settings, "namespace")
    with private_runtime(settings) as own:  # the session server's pool must not count
        live = start_server(
            own,
            own.data_dir,
            pool_size=0,
            extra_env={
                "CORRAL_MEMORY_OVERCOMMIT": repr(overcommit_for(settings, ONE_JOB_MIB)),
                "CORRAL_JOB_WORKERS": "2",
                "CORRAL_JOB_POOL": "0",
            },
        )
        yield live
        live.stop()


@pytest.fixture
async def api(tiny_server: LiveServer) -> AsyncIterator[JobApi]:
    client = JobApi(tiny_server.url, tiny_server.key)
    yield client
    await client.aclose()


async def test_a_job_the_full_host_cannot_start_waits_then_runs(api: JobApi) -> None:
    """Two jobs of 512 MiB, room for one, two worker slots: the second is not claimed
    while the first runs (it stays queued, attempt unspent, no event written), and runs
    once the first has ended."""
    first = (await api.submit({"command": ["sh", "-c", "sleep 3; echo first"]})).job
    second = (await api.submit({"command": ["echo", "second"]})).job
    await api.wait_until(first.id, lambda j: j.state == pb.JOB_STATE_RUNNING, timeout=20)
    await asyncio.sleep(1)  # claims meanwhile (every 0.25 s) must leave it alone
    waiting = await api.get(second.id)
    assert (waiting.state, waiting.attempt) == (pb.JOB_STATE_QUEUED, 0), waiting
    assert [e.type for e in await api.events(second.id)] == ["state"]

    ended = {j.id: await api.wait(j.id, timeout=60) for j in (first, second)}
    for done in ended.values():
        assert done.state == pb.JOB_STATE_SUCCEEDED, done
        assert (done.attempt, done.max_attempts) == (1, 1), done
    # It started once the first's sandbox was gone: after the first's 3 s of sleep.
    started, first_started = ended[second.id].started_at, ended[first.id].started_at
    assert started.ToDatetime() - first_started.ToDatetime() >= timedelta(seconds=3)
    assert await api.output(second.id) == b"second\n"
    for job_id in ended:
        events = await api.events(job_id)
        assert [e.type for e in events].count("requeued") == 0
        assert [e.state for e in events].count("running") == 1


async def test_a_job_larger_than_the_host_is_refused_at_submit(api: JobApi) -> None:
    before = len(await api.list_all())
    message = await refused(
        api.submit({"command": ["true"], "limits": {"memoryMib": 1024}}), Code.RESOURCE_EXHAUSTED
    )
    assert "memory_mib=1024" in message and "could never start here" in message, message
    assert "CORRAL_MEMORY_OVERCOMMIT" in message
    assert len(await api.list_all()) == before


# -- in-process workers ---------------------------------------------------------------------


@asynccontextmanager
async def running_worker(
    settings: Settings, store: Store, engine: Engine, concurrency: int
) -> AsyncIterator[Worker]:
    """An in-process `Worker` with `concurrency` slots and no warm pool, closed on exit."""
    worker = Worker(settings, store, engine=engine, concurrency=concurrency, pool_size=0)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.aclose()


async def wait_final(store: Store, job_id: str) -> JobRow:
    """The job's row once it has ended."""

    def final() -> JobRow | None:
        row = job(store, job_id)
        return row if row.final else None

    return await until(final, f"job {job_id} to end")


async def test_a_job_the_host_refuses_after_its_claim_waits_unspent(
    tiny: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims fit the host's free memory, but another process may take that room between
    a claim and its sandbox: here every claim reads the room of an idle host, as one would
    just before another process's admission. The host refuses the second job's sandbox;
    it goes back to the queue unspent and is claimed again when its worker's running job
    ends, not at its run_after: with a wait of an hour, only that wake-up can run it."""
    monkeypatch.setattr(job_lifecycle, "ROOM_WAIT_SECONDS", 3600.0)
    monkeypatch.setattr(job_lifecycle, "MAX_ROOM_WAIT_SECONDS", 3600.0)
    store = Store.open(tiny)
    try:
        team = store.create_team("waits")
        async with Engine(tiny) as engine:
            idle = engine.memory_capacity.mib
            monkeypatch.setattr(engine, "free_memory_mib", lambda **_: idle)  # a stale read
            queue = JobQueue(store, tiny, capacity=engine.memory_capacity)
            first, _, _ = await queue.submit(team, JobSpec.from_dict({"command": ["sleep", "1"]}))
            second, _, _ = await queue.submit(team, JobSpec.from_dict({"command": ["true"]}))
            async with running_worker(tiny, store, engine, concurrency=2):
                ended = [await wait_final(store, row.id) for row in (first, second)]
        assert [(r.state, r.attempt) for r in ended] == [("succeeded", 1), ("succeeded", 1)]
        assert store.count_events(second.id, "requeued") == 1
        assert store.count_events(first.id, "requeued") == 0
    finally:
        store.close()


async def test_a_worker_fails_a_job_larger_than_its_host_at_once(tiny: Settings) -> None:
    """Queued by a process that runs no workers (it cannot know the workers' hosts): the
    worker fails it on its first attempt, retries unspent, rather than wait forever."""
    store = Store.open(tiny)
    try:
        team = store.create_team("big")
        spec = JobSpec.from_dict(
            {"command": ["true"], "limits": {"memory_mib": 1024}, "retries": 2}
        )
        row, _, _ = await JobQueue(store, tiny).submit(team, spec)
        async with Engine(tiny) as engine:
            async with running_worker(tiny, store, engine, concurrency=1):
                ended = await wait_final(store, row.id)
            assert engine.sandboxes == {}
        assert ended.state == "failed" and ended.attempt == 1, ended
        assert "could never start here" in ended.state_reason, ended.state_reason
        assert "memory_mib=1024" in ended.state_reason
        types = [t for t, _ in event_types(store, row.id)]
        assert "retry_scheduled" not in types and "requeued" not in types, types
    finally:
        store.close()
