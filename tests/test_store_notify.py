"""Wake-ups through the store (`corral.store.notifications`): on PostgreSQL a worker or a
log follower in one process is woken by what another process commits, with no polling
(each waits with a poll of an hour, so only a wake-up can move it within the test's
ceiling); a LISTEN connection killed by the server comes back and re-reads, so a job
queued while it was down is still claimed. The same goes for the callback outbox: a
delivery another process owes is sent by this one's dispatcher at once. On SQLite other
processes' changes are seen by polling, as before."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest
from corral.isolation import Engine
from corral.jobs.callback_policy import CallbackPolicy
from corral.jobs.callbacks import CallbackDispatcher
from corral.jobs.queue import JobQueue, JobSignals
from corral.jobs.worker import Worker
from corral.store import Store, Team
from corral.store.job_rows import Attempt, JobRow
from tests.conftest import LOOPBACK_ALLOW, new_job_row
from tests.kit import postgres as kit_postgres
from tests.kit.http import CallbackReceiver
from tests.kit.polling import until

HOUR = 3600.0
# Well below the hour of polling: a wake-up moved the waiter, not its poll.
CEILING = 30.0


@pytest.fixture
def pg_url(postgres: kit_postgres.Cluster) -> Iterator[str]:
    """A fresh migrated PostgreSQL database of the test's own."""
    with postgres.database(template=kit_postgres.MIGRATED) as url:
        yield url


def open_store(settings: Settings, url: str) -> Store:
    return Store.open(settings, url=url)


@asynccontextmanager
async def listening_worker(settings: Settings, store: Store) -> AsyncIterator[Worker]:
    """An in-process worker that polls once an hour and heartbeats every twenty minutes,
    woken by the store's notifications, once its LISTEN connection is up."""
    signals = JobSignals()
    unlisten = signals.listen(store.notifications)
    worker = Worker(
        settings,
        store,
        engine=Engine(settings),
        signals=signals,
        poll=HOUR,
        lease=HOUR,
        pool_size=0,
    )
    await worker.start()
    try:
        await until(store.notifications.listening.is_set, "the store to LISTEN")
        await worker.tiers()  # probed before its first claim, which may take seconds
        await asyncio.sleep(0.2)  # the first claim (and the listen's re-check) done
        yield worker
    finally:
        await worker.aclose()
        await worker.engine.aclose()
        unlisten()


async def final(store: Store, job_id: str) -> JobRow:
    def ended() -> JobRow | None:
        row = store.job(job_id)
        return row if row is not None and row.final else None

    return await until(ended, f"job {job_id} to end", timeout=CEILING)


def states(store: Store, job_id: str) -> list[str | None]:
    return [e.state for e in store.job_events(job_id) if e.type == "state"]


async def test_a_job_queued_by_another_process_wakes_a_worker_at_once(
    settings: Settings, tmp_path: Path, pg_url: str
) -> None:
    store = open_store(settings, pg_url)
    try:
        team = store.create_team("woken")
        async with listening_worker(settings, store):
            row = await final(store, submit_elsewhere(pg_url, team, tmp_path))
        assert row.state == "succeeded", row
        assert states(store, row.id) == ["queued", "running", "succeeded"]
    finally:
        store.close()


def submit_elsewhere(url: str, team: Team, tmp_path: Path, callback_url: str = "") -> str:
    """Another process queues a job (with `callback_url`, its `queued` event owes a POST),
    as `corral` on another host would: straight into the store. The job's id."""
    return subprocess.run(
        [sys.executable, "-c", SUBMIT, url, team.name, str(tmp_path)],
        cwd=Path(__file__).parent.parent,
        input=callback_url,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()


SUBMIT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from corral.config import Settings
    from corral.store import Store
    from tests.conftest import new_job_row

    url, team, tmp = sys.argv[1:]
    hook = sys.stdin.read() or None
    store = Store.open(Settings(data_dir=Path(tmp) / "other"), url=url)
    row = new_job_row(store.team(team), callback_url=hook, callback_secret=hook and "s")
    store.insert_job(row)
    store.close()
    print(row.id)
    """
)


async def test_a_cancel_from_another_process_stops_a_running_job_at_once(
    settings: Settings, pg_url: str
) -> None:
    """Without the wake-up the worker would see the cancel at its next heartbeat, twenty
    minutes away."""
    store = open_store(settings, pg_url)
    other = open_store(settings, pg_url)
    try:
        team = store.create_team("stopped")
        spec = {"kind": "command", "command": ["sh", "-c", "echo up; exec sleep 600"]}
        async with listening_worker(settings, store):
            row, _ = other.insert_job(new_job_row(team, spec=spec))

            def printed() -> bool:
                found = store.job(row.id)
                return found is not None and found.next_log_seq > 0

            # Its command runs (a cancel while its sandbox starts is another path).
            await until(printed, "the job to print", timeout=CEILING)
            other.cancel_job(row.id, "by a test")
            ended = await final(store, row.id)
        assert ended.state == "canceled", ended
        assert states(store, row.id) == ["queued", "running", "canceled"]
    finally:
        other.close()
        store.close()


async def test_a_killed_listen_connection_comes_back_and_misses_no_job(
    settings: Settings, pg_url: str, postgres: kit_postgres.Cluster
) -> None:
    """The server ends the LISTEN connection; a job queued before it listens again (its
    NOTIFY heard by no one) is claimed once it does: the re-check after every connect."""
    store = open_store(settings, pg_url)
    other = open_store(settings, pg_url)  # another process's store: its own origin
    try:
        team = store.create_team("relisten")
        store.notifications.reconnect_delay = 1.0  # room to queue the job while it is down
        async with listening_worker(settings, store):
            killed = store.notifications.backend_pid
            assert killed is not None
            postgres.sql(f"SELECT pg_terminate_backend({int(killed)})")
            await until(lambda: not store.notifications.listening.is_set(), "the LISTEN to drop")
            row, _ = other.insert_job(new_job_row(team))
            assert not store.notifications.listening.is_set()  # its NOTIFY was unheard
            ended = await final(store, row.id)
        assert ended.state == "succeeded", ended
        assert store.notifications.backend_pid not in (None, killed)
    finally:
        other.close()
        store.close()


async def test_a_log_follower_gets_each_line_as_another_process_writes_it(
    settings: Settings, pg_url: str
) -> None:
    """The follower polls once an hour; the writer is another store (its own LISTEN, its
    own origin: to the follower's, another process)."""
    reader = open_store(settings, pg_url)
    writer = open_store(settings, pg_url)
    try:
        team = reader.create_team("follows")
        signals = JobSignals()
        unlisten = signals.listen(reader.notifications)
        signals.poll = HOUR
        await until(reader.notifications.listening.is_set, "the store to LISTEN")
        await _follow_as_written(reader, writer, team, JobQueue(reader, settings, signals=signals))
        unlisten()
    finally:
        writer.close()
        reader.close()


async def test_a_log_follower_on_sqlite_sees_another_process_by_polling(
    store_settings: Settings,
) -> None:
    """SQLite has no channel between processes: the follower's short poll finds the lines."""
    reader, writer = Store.open(store_settings), Store.open(store_settings)
    try:
        assert not reader.notifications.cross_process
        team = reader.create_team("polls")
        queue = JobQueue(reader, store_settings)
        await _follow_as_written(reader, writer, team, queue)
    finally:
        writer.close()
        reader.close()


async def _follow_as_written(reader: Store, writer: Store, team: Team, queue: JobQueue) -> None:
    """`writer` runs a job line by line; each line reaches `queue`'s follower before the
    next is written, and the follow ends with the job."""
    row, _ = writer.insert_job(new_job_row(team))
    (claimed,) = writer.claim_jobs("elsewhere:1:1", ["auto"], 1, 60)
    attempt = Attempt(row.id, "elsewhere:1:1", claimed.attempt)
    batches = queue.follow_logs(team, row.id, follow=True)
    got: list[bytes] = []
    for line in (b"one\n", b"two\n", b"three\n"):
        assert writer.append_logs(attempt, [(0, 1, line)], 1 << 20) == (True, 0)
        chunks, ended = await asyncio.wait_for(anext(batches), CEILING)
        got.extend(c.data for c in chunks)
        assert ended is None
        assert reader.connections_in_use == 0  # a stream holds no connection between reads
    writer.end_attempt(attempt, "succeeded", "exit 0", exit_code=0)
    chunks, ended = await asyncio.wait_for(anext(batches), CEILING)
    assert got == [b"one\n", b"two\n", b"three\n"] and not chunks
    assert ended is not None and ended.state == "succeeded"
    with pytest.raises(StopAsyncIteration):  # the follow ended with the job
        await anext(batches)


# -- the callback outbox -----------------------------------------------------------------------


@asynccontextmanager
async def listening_dispatcher(store: Store, interval: float) -> AsyncIterator[None]:
    """A callback dispatcher on `store` polling every `interval`, once its LISTEN is up."""
    dispatcher = CallbackDispatcher(store, CallbackPolicy.parse(LOOPBACK_ALLOW), interval=interval)
    dispatcher.start()
    try:
        await until(store.notifications.listening.is_set, "the store to LISTEN")
        yield
    finally:
        await dispatcher.aclose()


def delivered(store: Store, job_id: str) -> int:
    counts = store.callback_counts([job_id]).get(job_id)
    return 0 if counts is None else counts.delivered


async def test_a_callback_owed_by_another_process_is_sent_at_once(
    settings: Settings, tmp_path: Path, pg_url: str, receiver: CallbackReceiver
) -> None:
    """Another process submits a job with a callback URL; this process's dispatcher,
    polling once an hour, sends what its `queued` event owes."""
    store = open_store(settings, pg_url)
    try:
        team = store.create_team("called")
        async with listening_dispatcher(store, HOUR):
            job_id = submit_elsewhere(pg_url, team, tmp_path, receiver.url)
            await until(lambda: delivered(store, job_id) == 1, "the delivery", timeout=CEILING)
        (request,) = receiver.requests()
        assert request.headers["x-corral-job"] == job_id
        assert request.payload["state"] == "queued"
    finally:
        store.close()


async def test_a_killed_listen_connection_comes_back_and_misses_no_callback(
    settings: Settings, pg_url: str, postgres: kit_postgres.Cluster, receiver: CallbackReceiver
) -> None:
    """A delivery owed while the dispatcher's LISTEN connection is down (its NOTIFY heard
    by no one) is sent once it listens again: the re-check after every connect."""
    store = open_store(settings, pg_url)
    other = open_store(settings, pg_url)  # another process's store: its own origin
    try:
        team = store.create_team("recalled")
        store.notifications.reconnect_delay = 1.0  # room to owe one while it is down
        async with listening_dispatcher(store, HOUR):
            killed = store.notifications.backend_pid
            assert killed is not None
            postgres.sql(f"SELECT pg_terminate_backend({int(killed)})")
            await until(lambda: not store.notifications.listening.is_set(), "the LISTEN to drop")
            row, _ = other.insert_job(
                new_job_row(team, callback_url=receiver.url, callback_secret="s")
            )
            assert not store.notifications.listening.is_set()  # its NOTIFY was unheard
            await until(lambda: delivered(store, row.id) == 1, "the delivery", timeout=CEILING)
        assert store.notifications.backend_pid not in (None, killed)
    finally:
        other.close()
        store.close()


async def test_a_callback_owed_by_another_process_on_sqlite_is_found_by_polling(
    store_settings: Settings, receiver: CallbackReceiver
) -> None:
    """SQLite has no channel between processes: the dispatcher's default short poll finds
    what another store (another process) owes."""
    store, other = Store.open(store_settings), Store.open(store_settings)
    try:
        assert not store.notifications.cross_process
        team = store.create_team("polled")
        dispatcher = CallbackDispatcher(store, CallbackPolicy.parse(LOOPBACK_ALLOW))
        dispatcher.start()
        try:
            row, _ = other.insert_job(
                new_job_row(team, callback_url=receiver.url, callback_secret="s")
            )
            await until(lambda: delivered(store, row.id) == 1, "the delivery", timeout=CEILING)
        finally:
            await dispatcher.aclose()
    finally:
        other.close()
        store.close()


def test_a_pool_with_no_connection_is_refused_naming_its_variable() -> None:
    with pytest.raises(InvalidRequest, match="CORRAL_DATABASE_POOL_SIZE=0"):
        Settings.from_env({"CORRAL_DATABASE_POOL_SIZE": "0"})
    with pytest.raises(InvalidRequest, match="CORRAL_DATABASE_POOL_OVERFLOW"):
        Settings.from_env({"CORRAL_DATABASE_POOL_OVERFLOW": "-1"})
