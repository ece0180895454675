"""The store on real SQLite files and PostgreSQL (`database` in tests/conftest.py):
migrations, teams and keys, sandbox rows, metric points."""

from __future__ import annotations

import importlib
import sqlite3
import stat
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from corral.config import Settings
from corral.errors import InvalidRequest, NotFound, QuotaExceeded, Unauthenticated
from corral.store import MetricPoint, SandboxRow, Store, Team
from corral.store.database import MIGRATIONS
from corral.store.schema import metadata
from tests.conftest import new_sandbox_row


def _db_bytes(settings: Settings) -> bytes:
    """Everything SQLite wrote: the database file, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in settings.data_dir.glob("corral.db*"))


def _head() -> str:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


# -- schema -------------------------------------------------------------------------------


def test_migrations_create_the_schema_on_a_fresh_file(store_settings: Settings) -> None:
    path = store_settings.data_dir / "corral.db"
    assert not path.exists()
    store = Store.open(store_settings)
    store.create_team("acme")
    for file in store_settings.data_dir.glob("corral.db*"):  # with its -wal and -shm
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    store.close()
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert {"teams", "api_keys", "sandboxes", "sandbox_events", "metric_points"} <= tables
    assert version == [(_head(),)]
    assert stat.S_IMODE(store_settings.data_dir.stat().st_mode) == 0o700


def test_migrations_match_the_tables_in_code(store: Store) -> None:
    with store._read() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_migrations_are_idempotent_and_keep_data(store_settings: Settings) -> None:
    with_data = Store.open(store_settings)
    with_data.create_team("acme")
    with_data.close()
    for _ in range(2):
        again = Store.open(store_settings)
        assert [t.name for t in again.teams()] == ["acme"]
        again.close()
    with sqlite3.connect(store_settings.data_dir / "corral.db") as conn:
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)


@pytest.mark.sqlite_only
def test_sqlite_runs_in_wal_mode_with_foreign_keys(store: Store, store_settings: Settings) -> None:
    with sqlite3.connect(store_settings.data_dir / "corral.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with store._read() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000


@pytest.mark.parametrize("module", ["corral.store", "corral.sandboxes"])
def test_public_names_are_exactly_all(module: str) -> None:
    mod = importlib.import_module(module)
    public = {name for name in vars(mod) if not name.startswith("_")}
    submodules = {n for n in public if type(getattr(mod, n)).__name__ == "module"}
    assert set(mod.__all__) == public - submodules


# -- teams and keys ------------------------------------------------------------------------


def test_create_team_and_refuse_a_duplicate_or_malformed_name(store: Store) -> None:
    team = store.create_team("acme", max_sandboxes=3, max_memory_mib=1024)
    assert (team.name, team.max_sandboxes, team.max_memory_mib) == ("acme", 3, 1024)
    assert store.team("acme") == team
    with pytest.raises(InvalidRequest, match="exists already"):
        store.create_team("acme")
    for bad in ("", "Acme", "a b", "-x", "x" * 64, "ü"):
        with pytest.raises(InvalidRequest, match="malformed"):
            store.create_team(bad)
    with pytest.raises(InvalidRequest, match="max_sandboxes"):
        store.create_team("zero", max_sandboxes=0)
    assert [t.name for t in store.teams()] == ["acme"]


def test_a_teams_quotas_change_and_bad_ones_change_nothing(store: Store) -> None:
    team = store.create_team("acme")
    assert (team.max_memory_mib, team.max_cpu, team.max_running_jobs) == (8192, 16.0, 8)
    changed = store.set_quotas("acme", max_memory_mib=2048, max_cpu=1.5)
    assert (changed.max_memory_mib, changed.max_cpu) == (2048, 1.5)
    assert changed.max_running_jobs == 8 and store.team("acme") == changed
    for bad, match in (
        ({"max_cpu": 0}, "max_cpu=0 must be a number of at least 0.01"),
        ({"max_sandboxes": 2.5}, "max_sandboxes=2.5 must be an integer"),
        ({"max_memory_mib": True}, "max_memory_mib=True"),
        ({"max_gpus": 1}, "no quota 'max_gpus'"),
    ):
        with pytest.raises(InvalidRequest, match=match):
            store.set_quotas("acme", **bad)
    assert store.team("acme") == changed
    with pytest.raises(NotFound, match="corral admin team create ghost"):
        store.set_quotas("ghost", max_cpu=1)


def test_unknown_team_says_how_to_create_it(store: Store) -> None:
    with pytest.raises(NotFound, match="corral admin team create ghost"):
        store.team("ghost")
    with pytest.raises(NotFound):
        store.create_api_key("ghost")


@pytest.mark.sqlite_only  # it reads the database's files
def test_api_key_is_stored_hashed_and_authenticates(store: Store, store_settings: Settings) -> None:
    team = store.create_team("acme")
    key = store.create_api_key("acme")
    assert key.startswith("crl_") and len(key) == 36
    assert store.authenticate(key) == team
    store.close()  # checkpoint the WAL: the key must be in no file SQLite wrote
    raw = _db_bytes(store_settings)
    assert key.encode() not in raw
    assert key[4:].encode() not in raw
    assert key[:12].encode() in raw  # the display prefix is kept


def test_unknown_or_malformed_keys_are_unauthenticated(store: Store) -> None:
    store.create_team("acme")
    key = store.create_api_key("acme")
    for bad in ("", "crl_", key[:-1] + ("A" if key[-1] != "A" else "B"), key + "x", "Bearer"):
        with pytest.raises(Unauthenticated, match="unknown or revoked API key"):
            store.authenticate(bad)


def test_revoked_keys_stop_working_and_others_go_on(store: Store) -> None:
    store.create_team("acme")
    first, second, third = (store.create_api_key("acme") for _ in range(3))
    store.revoke_api_key(first)
    store.revoke_api_key(second[:12])  # by the displayed prefix
    store.revoke_api_key(second[:12])  # twice: a no-op
    for key in (first, second):
        with pytest.raises(Unauthenticated):
            store.authenticate(key)
    assert store.authenticate(third).name == "acme"


def test_revoking_an_unknown_key_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="no API key"):
        store.revoke_api_key("crl_" + "x" * 32)
    with pytest.raises(NotFound):
        store.revoke_api_key("crl_nope")


def test_ensure_default_team_is_idempotent_and_writes_the_key(
    store: Store, store_settings: Settings
) -> None:
    team, key = store.ensure_default_team()
    assert team.name == "default" and key is not None
    path = store_settings.data_dir / "default.key"
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.ensure_default_team() == (team, None)
    assert store.authenticate(key) == team
    # A revoked default key is replaced, in the file too.
    store.revoke_api_key(key)
    again, replacement = store.ensure_default_team()
    assert again == team and replacement not in (None, key)
    assert path.read_text().strip() == replacement


# -- sandbox rows and metric points --------------------------------------------------------


def _row(team: Team, sandbox_id: str, at: datetime) -> SandboxRow:
    return new_sandbox_row(
        team,
        id=sandbox_id,
        state="creating",
        state_reason="creating",
        metadata={"app": "x"},
        limits={"memory_mib": 256},
        expires_at=at + timedelta(seconds=300),
        created_at=at,
        updated_at=at,
        last_activity_at=at,
    )


def test_sandbox_rows_keep_aware_utc_times_and_events(store: Store) -> None:
    team = store.create_team("acme", max_sandboxes=1)
    at = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    store.insert_sandbox(_row(team, "sb_1", at))
    row = store.sandbox("sb_1")
    assert row is not None and row.created_at == at and row.created_at.tzinfo is UTC
    assert row.metadata == {"app": "x"} and row.limits == {"memory_mib": 256}
    with pytest.raises(QuotaExceeded, match=r"allows 1 \(max_sandboxes\)"):
        store.insert_sandbox(_row(team, "sb_2", at))
    assert store.transition("sb_1", "paused", "no", from_states=("running",)) is None
    running = store.transition("sb_1", "running", "created", from_states=("creating",))
    assert running is not None and running.state == "running"
    assert [(e.from_state, e.to_state) for e in store.events("sb_1")] == [
        (None, "creating"),
        ("creating", "running"),
    ]
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        store.update_sandbox("sb_1", expires_at=datetime(2025, 1, 1))


def test_metric_points_are_kept_for_a_window(store: Store) -> None:
    team = store.create_team("acme")
    at = datetime.now(UTC)
    store.insert_sandbox(_row(team, "sb_1", at))
    points = [MetricPoint(at + timedelta(seconds=i), 1.5, 100, 200, 3) for i in range(10)]
    store.add_metric_points("sb_1", "10m", points[:6], keep=timedelta(seconds=4))
    store.add_metric_points("sb_1", "10m", points[6:], keep=timedelta(seconds=4))
    assert store.metric_points("sb_1", "10m", limit=100) == points[6:]
    assert store.metric_points("sb_1", "10m", limit=2) == points[8:]
    assert store.metric_points("sb_1", "2h", limit=100) == []
