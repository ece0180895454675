"""Workers claim only jobs that fit the host's free memory.

A job whose sandbox the host has no room for yet used to be claimed, refused by the host
and requeued, again and again while it waited: three events (and, with a callback URL,
three deliveries) per round, and its started_at and worker those of a claim that never
ran. Now each job says how much memory its sandbox asks for (`memory_mib`, from its
limits), a worker claims with the host's free memory as a budget, and a job that does not
fit stays queued, untouched, until one that frees room ends. Fair shares between teams
hold: a team waits for room for its best job while other teams' jobs that fit pass, and
a big job due for `ROOM_RESERVE_SECONDS` reserves its room from them.

On real SQLite files through the store; then real in-process workers and real sandboxes
on a host whose capacity is made tiny (CORRAL_MEMORY_OVERCOMMIT).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from corral.config import Settings
from corral.isolation import Engine
from corral.jobs.queue import JobQueue
from corral.jobs.spec import JobSpec
from corral.store import Store
from corral.store.claims import ROOM_RESERVE_SECONDS
from corral.store.database import alembic_config
from corral.store.job_rows import JobRow
from corral.store.schema import jobs
from tests.conftest import new_job_row
from tests.kit.polling import until
from tests.test_job_capacity import running_worker, wait_final
from tests.test_job_store import event_types, job, submit


def claim(store: Store, room: int | None, capacity: int | None = None) -> list[JobRow]:
    return store.claim_jobs("w1", ("auto",), 10, 60, room_mib=room, capacity_mib=capacity)


def ids(rows: list[JobRow]) -> list[str]:
    return [r.id for r in rows]


# -- the store ------------------------------------------------------------------------------


def test_a_claim_takes_only_jobs_that_fit_what_is_left_of_the_room(store: Store) -> None:
    rows = [submit(store, store.create_team(name), memory_mib=512) for name in "abc"]
    claimed = claim(store, 1100)
    assert len(claimed) == 2  # 2 x 512 fit in 1100; the third would not
    (waiting,) = [r for r in rows if r.id not in ids(claimed)]
    # Not touched: queued, attempt 0, no event but its submit's.
    assert job(store, waiting.id) == waiting
    assert event_types(store, waiting.id) == [("state", "queued")]
    assert claim(store, 511) == []
    assert ids(claim(store, 512)) == [waiting.id]


def test_a_team_waits_for_room_for_its_best_job_while_other_teams_pass(store: Store) -> None:
    a, b = store.create_team("a"), store.create_team("b")
    big = submit(store, a, memory_mib=600, priority=10)
    small_a = submit(store, a, memory_mib=100)
    small_b = submit(store, b, memory_mib=100)
    # The big job does not fit: its team's smaller job does not pass it; b's job does.
    assert ids(claim(store, 300)) == [small_b.id]
    assert job(store, small_a.id).state == "queued"
    # Room for it: it goes first, its team's smaller job after it.
    assert ids(claim(store, 700)) == [big.id, small_a.id]


def test_a_big_job_due_long_reserves_its_room_from_other_teams(store: Store) -> None:
    a, b = store.create_team("a"), store.create_team("b")
    submit(store, b, memory_mib=100)
    assert len(claim(store, None)) == 1  # b has a running job: a's turn comes first
    long_ago = datetime.now(UTC) - timedelta(seconds=ROOM_RESERVE_SECONDS + 1)
    big = submit(store, a, memory_mib=600, run_after=long_ago, created_at=long_ago)
    small = submit(store, b, memory_mib=100)
    # 300 MiB free: b's small job would fit, but the room is the big one's to wait for.
    assert claim(store, 300) == []
    assert ids(claim(store, 600)) == [big.id]
    assert ids(claim(store, 100)) == [small.id]


def test_a_job_larger_than_the_host_is_claimed_to_be_failed(store: Store) -> None:
    """It needs no room (its worker fails it without a sandbox): it must not wait forever."""
    row = submit(store, store.create_team("a"), memory_mib=2048)
    assert ids(claim(store, 100, capacity=1024)) == [row.id]


async def test_submit_records_the_memory_of_the_jobs_sandbox(store: Store) -> None:
    team = store.create_team("a")
    queue = JobQueue(store, store.settings)
    default, _, _ = await queue.submit(team, JobSpec.from_dict({"command": ["true"]}))
    sized, _, _ = await queue.submit(
        team, JobSpec.from_dict({"command": ["true"], "limits": {"memory_mib": 64}})
    )
    assert (job(store, default.id).memory_mib, job(store, sized.id).memory_mib) == (512, 64)


@pytest.mark.usefixtures("database")  # on SQLite and PostgreSQL
def test_the_migration_fills_memory_from_the_specs_limits(store_settings: Settings) -> None:
    """Jobs queued before revision 0006 get their memory from their spec, else 512 MiB."""
    store = Store.open(store_settings)
    team = store.create_team("a")
    # On the store's database, but not through its connections: SQLite's would have foreign
    # keys on, and the downgrades' table copies (batch mode) would then cascade-delete rows.
    db = sa.create_engine(store._db.url)
    with db.begin() as conn:
        command.downgrade(alembic_config(conn), "0005")
        for spec in ({"command": ["true"]}, {"command": ["true"], "limits": {"memory_mib": 64}}):
            row = asdict(new_job_row(team, spec=spec))
            del row["memory_mib"], row["traceparent"]  # columns of later revisions
            conn.execute(jobs.insert().values(**row))
    db.dispose()
    store.close()
    store = Store.open(store_settings)  # migrates to the head again
    try:
        with store._read() as conn:
            found = conn.execute(sa.select(jobs.c.memory_mib).order_by(jobs.c.memory_mib))
            assert list(found.scalars()) == [64, 512]
    finally:
        store.close()


# -- in-process workers on a tiny host ------------------------------------------------------


def spec(command: list[str], memory_mib: int | None = None) -> JobSpec:
    limits = {} if memory_mib is None else {"limits": {"memory_mib": memory_mib}}
    return JobSpec.from_dict({"command": command, **limits})


async def test_a_job_the_host_has_no_room_for_stays_queued_until_room_frees(
    tiny: Settings,
) -> None:
    """Two jobs of 512 MiB, room for one, two worker slots: the second is not claimed while
    the first runs (no claim, no requeue: nothing written), then runs once it has ended."""
    store = Store.open(tiny)
    try:
        team = store.create_team("waits")
        async with Engine(tiny) as engine:
            queue = JobQueue(store, tiny, capacity=engine.memory_capacity)
            first, _, _ = await queue.submit(team, spec(["sleep", "3"]))
            second, _, _ = await queue.submit(team, spec(["true"]))
            submitted = job(store, second.id)
            async with running_worker(tiny, store, engine, concurrency=2):
                await until(lambda: job(store, first.id).state != "queued", "the first claim")
                waiting = job(store, second.id)
                ended = [await wait_final(store, row.id) for row in (first, second)]
        assert waiting == submitted  # untouched while the first ran
        assert [(r.state, r.attempt) for r in ended] == [("succeeded", 1), ("succeeded", 1)]
        assert ended[1].started_at is not None and ended[0].started_at is not None
        assert ended[1].started_at - ended[0].started_at >= timedelta(seconds=3)
        # One claim, the one that ran: no requeue round trip.
        assert event_types(store, second.id)[:2] == [("state", "queued"), ("state", "running")]
        for row in (first, second):
            assert store.count_events(row.id, "requeued") == 0
            assert [t for t, s in event_types(store, row.id) if s == "running"] == ["state"]
    finally:
        store.close()


async def test_a_small_job_of_another_team_runs_while_a_big_one_waits(tiny: Settings) -> None:
    store = Store.open(tiny)
    try:
        a, b = store.create_team("a"), store.create_team("b")
        async with Engine(tiny) as engine:
            queue = JobQueue(store, tiny, capacity=engine.memory_capacity)
            first, _, _ = await queue.submit(a, spec(["sleep", "4"]))
            big, _, _ = await queue.submit(a, spec(["true"]))
            submitted = job(store, big.id)
            async with running_worker(tiny, store, engine, concurrency=3):
                await until(lambda: job(store, first.id).state != "queued", "the first claim")
                small, _, _ = await queue.submit(b, spec(["true"], memory_mib=128))
                small_ended = await wait_final(store, small.id)
                big_meanwhile = job(store, big.id)
                ended = [await wait_final(store, row.id) for row in (first, big)]
        assert (small_ended.state, small_ended.attempt) == ("succeeded", 1)
        assert ended[0].finished_at is not None and small_ended.finished_at is not None
        assert small_ended.finished_at < ended[0].finished_at  # while the first still ran
        assert big_meanwhile == submitted  # the big one waited, untouched
        assert [(r.state, r.attempt) for r in ended] == [("succeeded", 1), ("succeeded", 1)]
        for row in (first, big, small):
            assert store.count_events(row.id, "requeued") == 0
    finally:
        store.close()
