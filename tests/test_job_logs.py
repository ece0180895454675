"""Job logs stay bounded (issue 9, finding 6): a per-team log quota, retention of finished
jobs by age, and output past a job's first bytes kept in a file per job instead of the
database, which stays small however much jobs print.

The store on real SQLite files, and live `corral server`s running real jobs in sandboxes.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import signal
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError

from corral.config import Settings
from corral.errors import InvalidRequest, NotFound
from corral.jobs.retention import BATCH_JOBS, Retention
from corral.store import Store, Team
from corral.store.database import MIGRATIONS
from corral.store.job_logs import INLINE_LOG_BYTES, MIB
from corral.store.job_rows import Attempt, JobRow
from corral.v1 import jobs_pb2 as pb
from tests.conftest import new_job_row, start_server, start_worker
from tests.kit.polling import until
from tests.test_jobs import JobApi, data

LIMIT = 16 * MIB  # the default per-job log limit


def running(store: Store, team: Team, **changes: Any) -> tuple[JobRow, Attempt]:
    """A job of `team` claimed by a worker: its row and the attempt that may write."""
    row, created = store.insert_job(new_job_row(team, **changes))
    assert created
    (claimed,) = [r for r in store.claim_jobs("w1", ("auto",), 100, 60) if r.id == row.id]
    return claimed, Attempt(row.id, "w1", claimed.attempt)


def finish(store: Store, attempt: Attempt) -> None:
    assert store.end_attempt(attempt, "succeeded", "exited with code 0", exit_code=0)


def job(store: Store, job_id: str) -> JobRow:
    row = store.job(job_id)
    assert row is not None
    return row


def log_file(settings: Settings, job_id: str) -> Path:
    return settings.data_dir / "job-logs" / f"{job_id}.log"


def output(store: Store, job_id: str, offset: int = 0) -> bytes:
    return b"".join(c.data for c in store.job_logs(job_id, offset))


# -- the team's log quota -------------------------------------------------------------------


def test_a_team_over_its_log_quota_has_further_output_dropped_with_an_event(
    store: Store,
) -> None:
    team = store.create_team("chatty", max_log_mib=1)
    other = store.create_team("quiet", max_log_mib=1)
    first, first_attempt = running(store, team)
    second, second_attempt = running(store, team)
    assert store.append_logs(first_attempt, [(0, 1, b"a" * 700_000)], LIMIT) == (True, 0)
    # The second job fills what is left of the team's MiB; the rest is dropped, the job
    # goes on (its writes still succeed) and says why once.
    assert store.append_logs(second_attempt, [(0, 1, b"b" * 700_000)], LIMIT) == (
        True,
        700_000 - (MIB - 700_000),
    )
    assert store.append_logs(second_attempt, [(0, 2, b"c" * 10)], LIMIT) == (True, 10)
    assert store.team_log_bytes(team.id) == MIB
    after = job(store, second.id)
    assert after.log_truncated and after.log_bytes == MIB - 700_000 and after.state == "running"
    assert output(store, second.id) == b"b" * (MIB - 700_000)
    truncated = [e for e in store.job_events(second.id) if e.type == "log_truncated"]
    assert len(truncated) == 1
    assert truncated[0].data == {"limit_bytes": MIB, "quota": "max_log_mib"}
    assert "team's log quota of 1 MiB (max_log_mib)" in truncated[0].reason
    # The first job, under the quota when it wrote, is untouched; so is another team.
    assert not job(store, first.id).log_truncated
    _, other_attempt = running(store, other)
    assert store.append_logs(other_attempt, [(0, 1, b"d" * 700_000)], LIMIT) == (True, 0)


def test_the_per_job_limit_still_names_itself(store: Store) -> None:
    team = store.create_team("acme")
    row, attempt = running(store, team)
    assert store.append_logs(attempt, [(0, 1, b"x" * 30)], 20) == (True, 10)
    (event,) = [e for e in store.job_events(row.id) if e.type == "log_truncated"]
    assert event.data == {"limit_bytes": 20} and "log limit of 20 bytes" in event.reason


@pytest.mark.sqlite_only  # logs in files beside SQLite (PostgreSQL keeps them in rows)
def test_retention_gives_the_team_its_quota_back(store: Store, store_settings: Settings) -> None:
    team = store.create_team("acme", max_log_mib=1)
    old, old_attempt = running(store, team)
    store.append_logs(old_attempt, [(0, 1, b"o" * MIB)], LIMIT)
    finish(store, old_attempt)
    assert log_file(store_settings, old.id).exists()
    _, full_attempt = running(store, team)
    assert store.append_logs(full_attempt, [(0, 1, b"x")], LIMIT) == (True, 1)

    assert store.delete_finished_jobs(datetime.now(UTC) + timedelta(seconds=1), 10) == 1
    assert store.team_log_bytes(team.id) == 0
    assert not log_file(store_settings, old.id).exists()
    new, new_attempt = running(store, team)
    assert store.append_logs(new_attempt, [(0, 1, b"n" * 1000)], LIMIT) == (True, 0)
    assert store.team_log_bytes(team.id) == 1000 and output(store, new.id) == b"n" * 1000


# -- retention by age -----------------------------------------------------------------------


def test_retention_deletes_old_finished_jobs_and_keeps_recent_and_running_ones(
    store: Store, store_settings: Settings
) -> None:
    team = store.create_team("acme")
    old = []
    for _ in range(3):
        row, attempt = running(store, team)
        store.append_logs(attempt, [(0, 1, b"old" * 10_000)], LIMIT)
        finish(store, attempt)
        old.append(row.id)
    cutoff = datetime.now(UTC)
    time.sleep(0.01)
    recent, recent_attempt = running(store, team)
    store.append_logs(recent_attempt, [(0, 1, b"recent" * 10_000)], LIMIT)
    finish(store, recent_attempt)
    live, live_attempt = running(store, team)
    store.append_logs(live_attempt, [(0, 1, b"live" * 10_000)], LIMIT)
    queued, _ = store.insert_job(new_job_row(team))

    # In batches: each call deletes at most its limit, oldest first.
    assert store.delete_finished_jobs(cutoff, 2) == 2
    assert store.delete_finished_jobs(cutoff, 2) == 1
    assert store.delete_finished_jobs(cutoff, 2) == 0
    for job_id in old:
        assert store.job(job_id) is None
        assert store.job_logs(job_id) == [] and store.job_events(job_id) == []
        assert not log_file(store_settings, job_id).exists()
    assert output(store, recent.id) == b"recent" * 10_000
    assert output(store, live.id) == b"live" * 10_000
    assert job(store, queued.id).state == "queued"
    assert store.team_log_bytes(team.id) == 60_000 + 40_000
    # Running and queued jobs are never deleted, however old the cutoff.
    store.delete_finished_jobs(datetime.now(UTC) + timedelta(days=1), 100)
    assert job(store, live.id).state == "running" and job(store, queued.id).state == "queued"
    assert output(store, live.id) == b"live" * 10_000


async def test_a_sweep_deletes_every_expired_job_in_batches(store: Store) -> None:
    team = store.create_team("acme")
    expired = []
    for _ in range(BATCH_JOBS + 10):
        row, attempt = running(store, team)
        store.append_logs(attempt, [(0, 1, b"x" * 20_000)], LIMIT)
        finish(store, attempt)
        expired.append(row.id)
    await asyncio.sleep(1.1)
    kept, kept_attempt = running(store, team)
    finish(store, kept_attempt)
    assert await Retention(store, 1).sweep() == BATCH_JOBS + 10
    assert all(store.job(job_id) is None for job_id in expired)
    assert job(store, kept.id).state == "succeeded"
    assert store.team_log_bytes(team.id) == 0


@pytest.mark.parametrize("seconds", [-1, True, "7d"])
def test_a_bad_retention_is_refused_saying_what_to_use(store: Store, seconds: Any) -> None:
    with pytest.raises(InvalidRequest, match=r"CORRAL_JOB_RETENTION=.* whole number of seconds"):
        Retention(store, seconds)


@pytest.mark.sqlite_only  # logs in files beside SQLite (PostgreSQL keeps them in rows)
def test_logs_whose_file_is_gone_read_as_deleted_not_as_an_error(
    store: Store, store_settings: Settings
) -> None:
    """A reader racing the retention sweep: the rows were read, the file is gone."""
    team = store.create_team("acme")
    row, attempt = running(store, team)
    store.append_logs(attempt, [(0, 1, b"z" * 100_000)], LIMIT)
    log_file(store_settings, row.id).unlink()
    with pytest.raises(NotFound, match="CORRAL_JOB_RETENTION"):
        store.job_logs(row.id)


# -- logs outside the database ---------------------------------------------------------------


@pytest.mark.sqlite_only  # logs in files beside SQLite (PostgreSQL keeps them in rows)
def test_logs_read_in_order_from_any_seq_across_the_file_boundary(
    store: Store, store_settings: Settings
) -> None:
    team = store.create_team("acme")
    row, attempt = running(store, team)
    sent: list[tuple[int, bytes]] = []
    for i in range(40):  # 1 KiB … 40 KiB chunks: the first few inline, the rest in the file
        chunk = (b"%d:" % i) + bytes([65 + i % 26]) * (1024 * (i + 1))
        stream = 1 + i % 2  # alternate streams: one row per chunk
        store.append_logs(attempt, [(0, stream, chunk)], LIMIT)
        sent.append((stream, chunk))
    with sqlite3.connect(store_settings.data_dir / "corral.db") as conn:
        inline = conn.execute(
            "SELECT sum(length(data)) FROM job_logs WHERE job_id = ?", (row.id,)
        ).fetchone()[0]
        in_file = conn.execute(
            "SELECT count(*) FROM job_logs WHERE job_id = ? AND file_offset IS NOT NULL", (row.id,)
        ).fetchone()[0]
    assert 0 < inline <= INLINE_LOG_BYTES and in_file > 30
    assert log_file(store_settings, row.id).stat().st_size == sum(len(c) for _, c in sent) - inline
    for offset in range(len(sent)):
        chunks = store.job_logs(row.id, offset)
        assert [(c.seq, c.stream, c.data) for c in chunks] == [
            (seq, stream, data) for seq, (stream, data) in enumerate(sent) if seq >= offset
        ]
    # A page stops once it holds max_bytes (at least one chunk, however large).
    page = store.job_logs(row.id, 10, max_bytes=30_000)
    assert [c.seq for c in page] == [10, 11, 12]
    assert [c.seq for c in store.job_logs(row.id, 39, max_bytes=1)] == [39]


@pytest.mark.sqlite_only  # logs in files beside SQLite (PostgreSQL keeps them in rows)
def test_bytes_of_a_write_that_never_committed_are_skipped(
    store: Store, store_settings: Settings
) -> None:
    """A worker killed between its file write and its commit leaves bytes no row points
    at; the next write (its job's next attempt) goes after them."""
    team = store.create_team("acme")
    row, attempt = running(store, team)
    store.append_logs(attempt, [(0, 1, b"a" * 40_000)], LIMIT)
    with log_file(store_settings, row.id).open("ab") as f:
        f.write(b"never committed")
    store.append_logs(attempt, [(0, 2, b"b" * 40_000)], LIMIT)
    assert [(c.stream, c.data) for c in store.job_logs(row.id)] == [
        (1, b"a" * 40_000),
        (2, b"b" * 40_000),
    ]


def test_adjacent_reads_of_one_stream_are_stored_as_one_chunk(store: Store) -> None:
    team = store.create_team("acme")
    row, attempt = running(store, team)
    store.append_logs(
        attempt, [(0, 1, b"a" * 9000), (0, 1, b"b" * 9000), (0, 2, b"e"), (0, 1, b"c")], LIMIT
    )
    chunks = store.job_logs(row.id)
    assert [(c.seq, c.stream, c.data) for c in chunks] == [
        (0, 1, b"a" * 9000 + b"b" * 9000),
        (1, 2, b"e"),
        (2, 1, b"c"),
    ]


def test_migrating_keeps_inline_logs_and_counts_each_teams_total(
    store_settings: Settings,
) -> None:
    """A store of revision 0003, logs in its rows, brought to 0004: the old rows read as
    before and the team's total starts at what its jobs keep."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    store_settings.data_dir.mkdir(parents=True)
    path = store_settings.data_dir / "corral.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        command.upgrade(config, "0003")
        now = datetime.now(UTC).replace(tzinfo=None)
        conn.execute(
            sa.text(
                "INSERT INTO teams (id, name, max_sandboxes, max_memory_mib, created_at) "
                "VALUES ('team_x', 'x', 20, 8192, :now)"
            ),
            {"now": now},
        )
        old = new_job_row(Team("team_x", "x"), state="succeeded", log_bytes=5, next_log_seq=2)
        values = {**old.__dict__, "spec": "{}", "labels": "{}"}
        del values["memory_mib"], values["traceparent"]  # columns of revisions 0006, 0017
        for key in ("run_after", "created_at", "updated_at"):
            values[key] = now
        columns, params = ", ".join(values), ", ".join(":" + k for k in values)
        conn.execute(sa.text(f"INSERT INTO jobs ({columns}) VALUES ({params})"), values)
        for seq, chunk in enumerate((b"he", b"llo")):
            conn.execute(
                sa.text(
                    "INSERT INTO job_logs (job_id, seq, attempt, step, stream, data, at) "
                    "VALUES (:job, :seq, 1, 0, 1, :data, :now)"
                ),
                {"job": old.id, "seq": seq, "data": chunk, "now": now},
            )
    engine.dispose()
    store = Store.open(store_settings)
    try:
        assert store.team_log_bytes("team_x") == 5
        assert [(c.seq, c.data) for c in store.job_logs(old.id)] == [(0, b"he"), (1, b"llo")]
        assert [c.data for c in store.job_logs(old.id, max_bytes=2)] == [b"he"]
    finally:
        store.close()


# -- live servers ---------------------------------------------------------------------------


def db_file_bytes(data_dir: Path) -> int:
    """corral.db once its server stopped (the last connection folds the WAL into it)."""
    assert not (data_dir / "corral.db-wal").exists()
    return (data_dir / "corral.db").stat().st_size


def mib_of(tag: str, mib: int) -> bytes:
    """What `print_mib(mib, tag)` prints."""
    line = (tag * 64)[:63].encode() + b"\n"
    return line * (mib * MIB // 64)


def print_mib(mib: int, tag: str) -> str:
    return f"yes {(tag * 64)[:63]} | head -c {mib * MIB}"


@pytest.mark.sandbox
@pytest.mark.usefixtures("sandbox_host")
async def test_the_database_stays_small_while_jobs_print_many_mib_and_reads_survive_a_restart(
    settings: Settings,
) -> None:
    """The attack: six jobs printing 16 MiB each grew the database by 95 MiB."""
    data_dir = settings.runtime_dir / f"logsize-{secrets.token_hex(4)}"
    live = start_server(settings, data_dir, pool_size=0)
    api = JobApi(live.url, live.key)
    warmup = await api.submit({"command": ["true"]})
    await api.wait(warmup.job.id, timeout=60)
    live.stop()
    before = db_file_bytes(data_dir)

    live = start_server(settings, data_dir, pool_size=0)
    api = JobApi(live.url, live.key)
    tags = [f"job{i}-" for i in range(6)]
    ids = [(await api.submit({"run": print_mib(16, tag)})).job.id for tag in tags]
    for job_id in ids:
        job = await api.wait(job_id, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job
        assert job.log_bytes == 16 * MIB and not job.log_truncated
    await api.aclose()
    live.stop()
    grown = db_file_bytes(data_dir) - before
    assert grown < MIB, f"the database grew by {grown} bytes for 96 MiB of logs"

    # After a restart every byte reads back, in order, from the start or from any seq.
    live = start_server(settings, data_dir, pool_size=0)
    api = JobApi(live.url, live.key)
    for job_id, tag in zip(ids, tags, strict=True):
        chunks = await api.logs(job_id)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        got = b"".join(c.data for c in chunks)
        assert hashlib.sha256(got).digest() == hashlib.sha256(mib_of(tag, 16)).digest()
    middle = len(chunks) // 2
    tail = await api.logs(ids[-1], offset=middle)
    assert [c.seq for c in tail] == list(range(middle, len(chunks)))
    assert b"".join(c.data for c in tail) == b"".join(c.data for c in chunks[middle:])
    await api.aclose()


@pytest.mark.sandbox
@pytest.mark.usefixtures("sandbox_host")
async def test_a_team_over_its_log_quota_gets_its_output_dropped_not_its_jobs_failed(
    settings: Settings,
) -> None:
    live = start_server(settings, settings.runtime_dir / f"quota-{secrets.token_hex(4)}")
    created = live.corral("admin", "team", "create", "tiny", "--max-log-mib", "1")
    assert created.returncode == 0, created.stderr
    key = live.corral("admin", "key", "create", "--team", "tiny")
    assert key.returncode == 0, key.stderr
    tiny = JobApi(live.url, key.stdout.strip().splitlines()[-1])
    default = JobApi(live.url, live.key)

    first = await tiny.wait((await tiny.submit({"run": print_mib(3, "q")})).job.id, timeout=120)
    assert first.state == pb.JOB_STATE_SUCCEEDED, first
    assert first.log_bytes == MIB and first.log_truncated
    (event,) = [e for e in await tiny.events(first.id) if e.type == "log_truncated"]
    assert data(event) == {"limit_bytes": MIB, "quota": "max_log_mib"}
    assert "max_log_mib" in event.reason
    assert len(await tiny.output(first.id)) == MIB

    # The team's quota is full: its next job keeps nothing, and still succeeds.
    second = await tiny.wait((await tiny.submit({"run": "echo more"})).job.id, timeout=60)
    assert second.state == pb.JOB_STATE_SUCCEEDED and second.exit_code == 0
    assert second.log_bytes == 0 and second.log_truncated
    # Another team's jobs are not touched by it.
    other = await default.wait((await default.submit({"run": print_mib(2, "d")})).job.id)
    assert other.log_bytes == 2 * MIB and not other.log_truncated
    await tiny.aclose()
    await default.aclose()


@pytest.mark.sandbox
@pytest.mark.usefixtures("sandbox_host")
async def test_retention_deletes_finished_jobs_and_a_read_says_why(settings: Settings) -> None:
    data_dir = settings.runtime_dir / f"retention-{secrets.token_hex(4)}"
    live = start_server(settings, data_dir, extra_env={"CORRAL_JOB_RETENTION": "2"})
    api = JobApi(live.url, live.key)
    done = await api.wait((await api.submit({"run": print_mib(1, "r")})).job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED
    assert (data_dir / "job-logs" / f"{done.id}.log").exists()
    slow = (await api.submit({"run": "echo started; sleep 60"})).job.id
    await api.first_logs(slow)

    async def deleted() -> bool:
        try:
            await api.get(done.id)
        except ConnectError as exc:
            assert exc.code == Code.NOT_FOUND and "CORRAL_JOB_RETENTION" in str(exc), exc
            return True
        return False

    await until(deleted, "the finished job to be deleted", interval=0.2)
    with pytest.raises(ConnectError) as caught:
        await api.logs(done.id)
    assert caught.value.code == Code.NOT_FOUND
    assert "deleted" in str(caught.value) and "CORRAL_JOB_RETENTION" in str(caught.value)
    assert not (data_dir / "job-logs" / f"{done.id}.log").exists()
    # The job that was running meanwhile is kept, with its output.
    assert (await api.get(slow)).state == pb.JOB_STATE_RUNNING
    assert await api.output(slow) == b"started\n"
    await api.cancel(slow)
    await api.aclose()


@pytest.mark.sandbox
@pytest.mark.usefixtures("sandbox_host")
async def test_worker_processes_share_the_log_files_and_a_killed_one_loses_nothing_acknowledged(
    settings: Settings,
) -> None:
    """`corral worker`s on one host write their jobs' files in the data directory the
    server reads; a worker SIGKILLed mid-write leaves every acknowledged chunk readable,
    and the job's next attempt appends after whatever it left."""
    data_dir = settings.runtime_dir / f"workers-{secrets.token_hex(4)}"
    env = {"CORRAL_JOB_WORKERS": "0", "CORRAL_JOB_LEASE": "2"}
    live = start_server(settings, data_dir, pool_size=0, extra_env=env)
    workers = [start_worker(live, CORRAL_JOB_WORKERS="2") for _ in range(2)]
    api = JobApi(live.url, live.key)
    try:
        first_only = (
            f'if [ "$CORRAL_JOB_ATTEMPT" = 1 ]; then {print_mib(1, "a")}; exec sleep 600; fi'
        )
        killed = (await api.submit({"run": f"{first_only}\n{print_mib(2, 'b')}"})).job.id
        others = [(await api.submit({"run": print_mib(1, f"o{i}")})).job.id for i in range(3)]
        running = await api.wait_until(killed, lambda job: job.log_bytes == MIB)
        seen = await api.logs(killed)
        pid = int(running.worker.split(":")[1])
        (victim,) = [w for w in workers if w.process.pid == pid]
        victim.stop(signal.SIGKILL)

        job = await api.wait(killed, timeout=120)
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempt == 2, job
        chunks = await api.logs(killed)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert [(c.seq, c.data) for c in chunks[: len(seen)]] == [(c.seq, c.data) for c in seen]
        first = b"".join(c.data for c in chunks if c.attempt == 1)
        second = b"".join(c.data for c in chunks if c.attempt == 2)
        assert first == mib_of("a", 1) and second == mib_of("b", 2)
        for i, job_id in enumerate(others):  # some may have run on the killed worker too
            other = await api.wait(job_id, timeout=120)
            assert other.state == pb.JOB_STATE_SUCCEEDED
            assert await api.output(job_id, other.attempt) == mib_of(f"o{i}", 1)
    finally:
        await api.aclose()
        for worker in workers:
            worker.stop(signal.SIGKILL)
