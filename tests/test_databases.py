"""The store on both its databases, SQLite and PostgreSQL: every migration from an empty
database and back, `corral admin migrate`, the refusal of a schema newer than the code,
PostgreSQL's claims skipping what another transaction holds (FOR UPDATE SKIP LOCKED), and
its pipelined writes: atomic, and as few round trips as they read."""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from corral.config import Settings
from corral.errors import SchemaTooNew
from corral.store import Store, Team
from corral.store.database import MIGRATIONS, alembic_config, unread
from corral.store.job_rows import Attempt, JobRow
from corral.store.schema import jobs, metadata, teams
from tests.conftest import DATABASES, TEST_CGROUP_PARENT
from tests.kit.postgres import Cluster
from tests.test_job_store import ISOLATIONS, submit

HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()


@pytest.fixture(params=DATABASES)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (no table at all), on each database. PostgreSQL's is
    given as an operator writes it, without a driver (psycopg is the one Corral uses)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'corral.db'}"
        return
    cluster: Cluster = request.getfixturevalue("postgres")
    with cluster.database() as url:
        yield url.replace("postgresql+psycopg://", "postgresql://")


def tables(store: Store) -> set[str]:
    with store._read() as conn:
        return set(sa.inspect(conn).get_table_names()) - {"alembic_version"}


def test_every_migration_runs_from_empty_down_to_empty_and_up_again(
    empty_url: str, tmp_path: Path
) -> None:
    store = Store.open(Settings(data_dir=tmp_path), url=empty_url)
    try:
        assert (store.schema.before, store.schema.after) == (None, HEAD)
        team = store.create_team("acme")
        with store._write() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert tables(store) == set()
        with store._write() as conn:
            command.upgrade(alembic_config(conn), "head")
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert tables(store) == set(metadata.tables)
        assert store.teams() == []  # the downgrade dropped the team with its table
        assert store.create_team("acme").name == team.name
    finally:
        store.close()


def corral(url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`corral ARGS` on the database at `url`, as an operator runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        env={
            **env,
            "CORRAL_DATA_DIR": str(data_dir),
            "CORRAL_DATABASE_URL": url,
            # A server's own, never the machine's (it is refused before it uses them).
            "CORRAL_RUNTIME_DIR": str(data_dir / "run"),
            "CORRAL_CONFIG": str(data_dir / "config"),
            "CORRAL_CGROUP_PARENT": TEST_CGROUP_PARENT,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.acceptance  # the CLI as an operator runs it
def test_admin_migrate_says_what_it_did_and_a_newer_schema_is_refused(
    empty_url: str, tmp_path: Path
) -> None:
    done = corral(empty_url, tmp_path, "admin", "migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"schema migrated from revision (empty) to {HEAD}\n"
    done = corral(empty_url, tmp_path, "admin", "migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"schema at revision {HEAD}: up to date\n"

    # A newer Corral migrated it to a revision this code does not have.
    store = Store.open(Settings(data_dir=tmp_path), url=empty_url)
    store.create_team("acme")
    with store._write() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    store.close()
    with pytest.raises(SchemaTooNew, match=f"revision 0099, which this Corral .schema {HEAD}"):
        Store.open(Settings(data_dir=tmp_path), url=empty_url)
    for args in (("admin", "migrate"), ("admin", "team", "list"), ("server", "--port", "0")):
        done = corral(empty_url, tmp_path, *args)
        assert done.returncode != 0
        assert "is at schema revision 0099" in done.stderr
        assert "Upgrade Corral" in done.stderr
        assert "Traceback" not in done.stderr

    # Nothing was changed: neither the revision nor the rows.
    engine = sa.create_engine(empty_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [("0099",)]
        assert conn.execute(sa.select(teams.c.name)).scalars().all() == ["acme"]
    engine.dispose()


@pytest.fixture
def held(postgres: Cluster, store: Store) -> Iterator[sa.Connection]:
    """A second connection to the store's PostgreSQL database, in a transaction: what it
    locks stays locked until the test ends (another worker in the middle of its claim)."""
    engine = sa.create_engine(store._db.url)
    with engine.connect() as conn, conn.begin():
        yield conn
    engine.dispose()


def claim_beside(store: Store, limit: int) -> list[str]:
    """`store.claim_jobs` in a thread: a claim that waited for a lock instead of skipping
    the locked row would still be waiting after 30 s (the lock is held to the test's end)."""
    found: list[str] = []
    thread = threading.Thread(
        target=lambda: found.extend(r.id for r in store.claim_jobs("w1", ISOLATIONS, limit, 60)),
        daemon=True,
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the claim waited for the lock another transaction holds"
    return found


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_claim_skips_the_jobs_and_teams_another_claim_holds(
    store: Store, held: sa.Connection
) -> None:
    acme, other = store.create_team("acme"), store.create_team("other")
    first, second = submit(store, acme), submit(store, acme)
    theirs = submit(store, other)
    # Another claimer holds acme's best job (it is in the middle of taking it).
    locked = sa.select(jobs.c.id).where(jobs.c.id == first.id).with_for_update()
    assert held.execute(locked).scalar_one() == first.id
    assert sorted(claim_beside(store, 10)) == sorted([second.id, theirs.id])
    # One that holds a team's row (it is counting the team's running jobs) has the team to
    # itself for now: this claim takes the other team's job only.
    submit(store, other)
    later = submit(store, acme)
    held.execute(sa.select(teams.c.id).where(teams.c.id == other.id).with_for_update())
    assert claim_beside(store, 10) == [later.id]


def test_the_store_is_the_database_it_was_asked_for(store: Store, database: str) -> None:
    """The parametrized `store` really runs on each database (not SQLite twice)."""
    assert store._db.dialect.name == ("postgresql" if database else "sqlite")
    assert isinstance(store.create_team("acme"), Team)


def test_a_migration_that_rebuilds_a_table_keeps_the_rows_that_refer_to_it(store: Store) -> None:
    # 0016's downgrade rebuilds `teams` on SQLite (a batch copy): with foreign keys on in
    # the migration's transaction, dropping the old table deleted every API key. 0017's
    # rebuilds `jobs`, which job events refer to.
    team = store.create_team("keepers")
    key = store.create_api_key(team.name)
    job = submit(store, team, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    with store.migrating() as conn:
        command.downgrade(alembic_config(conn), "0015")
    with store.migrating() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert store.authenticate(key).name == "keepers"
    kept = store.job(job.id)
    assert kept is not None and kept.traceparent is None  # the column came back empty
    assert [e.state for e in store.job_events(job.id)] == ["queued"]


# -- PostgreSQL's pipelined writes (`Database._pipelined`) -----------------------------------


def test_a_write_whose_unread_statement_fails_changes_nothing(store: Store) -> None:
    """An `unread` statement's error comes back only with the COMMIT on PostgreSQL: the
    whole write still fails, as SQLAlchemy's IntegrityError, and keeps none of its changes."""
    acme = store.create_team("acme")
    job = submit(store, acme)
    raise_quota = unread(teams.update().where(teams.c.id == acme.id).values(max_cpu=99))
    with pytest.raises(sa.exc.IntegrityError), store._write() as conn:
        conn.execute(raise_quota)
        conn.execute(unread(jobs.insert()), asdict(job))  # the same id again
    assert store.team("acme").max_cpu == acme.max_cpu
    assert submit(store, acme).state == "queued"  # the connection went back to the pool clean


def test_only_a_statement_whose_result_is_not_there_to_read_may_be_unread() -> None:
    """An unread statement's rows would read as none on PostgreSQL (they come back with
    the COMMIT): one that returns rows is refused where it is marked, on both databases."""
    for returns_rows in (
        sa.select(teams.c.id),
        teams.update().values(max_cpu=1).returning(teams.c.id),
        jobs.insert().returning(jobs.c.id),
    ):
        with pytest.raises(TypeError, match="without RETURNING"):
            unread(returns_rows)
    for statement in (teams.update().values(max_cpu=1), jobs.insert(), jobs.delete()):
        unread(statement)


def test_a_write_that_raises_midway_changes_nothing(store: Store) -> None:
    acme = store.create_team("acme")
    with pytest.raises(RuntimeError), store._write() as conn:
        conn.execute(unread(teams.update().where(teams.c.id == acme.id).values(max_cpu=99)))
        assert conn.execute(sa.select(teams.c.max_cpu)).scalar_one() == 99  # its own write
        raise RuntimeError("midway")
    assert store.team("acme").max_cpu == acme.max_cpu


def round_trips(store: Store, call: Callable[[], object]) -> int:
    """How often `call` waits on the server: its exchanges (the client's messages, then the
    server's) in libpq's trace of the connections it takes from the pool."""
    traced: list[Any] = []

    def trace(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        dbapi_connection.pgconn.trace(log.fileno())
        traced.append(dbapi_connection.pgconn)

    with tempfile.TemporaryFile("w+") as log:
        sa.event.listen(store._db, "checkout", trace)
        try:
            call()
        finally:
            sa.event.remove(store._db, "checkout", trace)
            for pgconn in traced:
                pgconn.untrace()
        log.seek(0)
        senders = [line.split("\t")[1] for line in log if line.count("\t") >= 2]
    return sum(1 for a, b in itertools.pairwise(["B", *senders]) if (a, b) == ("B", "F"))


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_jobs_writes_wait_only_for_what_they_read_and_their_commit(store: Store) -> None:
    """A submit waits once (its INSERTs and COMMIT go together); a claim for its three reads
    (teams with due jobs, the team's lock, its due jobs with its running count) and its end; an
    output write and an attempt's end twice (the job's row under lock, then the rest)."""
    acme = store.create_team("acme")
    assert round_trips(store, lambda: submit(store, acme)) == 1
    claims: list[JobRow] = []
    assert round_trips(store, lambda: claims.extend(store.claim_jobs("w1", ISOLATIONS, 1, 60))) == 4
    (claimed,) = claims
    attempt = Attempt(claimed.id, "w1", claimed.attempt)
    assert round_trips(store, lambda: store.append_logs(attempt, [(0, 1, b"hi\n")], 1 << 20)) == 2
    end = functools.partial(store.end_attempt, attempt, "succeeded", "done", exit_code=0)
    assert round_trips(store, end) == 2
    assert store.job(claimed.id).state == "succeeded"  # type: ignore[union-attr]
    assert [c.data for c in store.job_logs(claimed.id)] == [b"hi\n"]
