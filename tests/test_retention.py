"""Retention of what the store would keep forever (`corral.jobs.retention`): ended
sandboxes with everything about them, old sandbox and network events, old metric points,
finished jobs with their log files. Older than the age goes, newer stays; a big backlog
goes in several batches while the store keeps answering others. (Jobs alone by age, and
the team's log quota given back: tests/test_job_logs.py.)

The store on real SQLite files; ages set by writing rows with old timestamps.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest
from corral.jobs.retention import Retention
from corral.network.events import NetworkEvent
from corral.store import Store
from corral.store.e2b import E2bSandboxRow
from corral.store.metrics import MetricPoint
from corral.store.schema import sandbox_events
from tests.conftest import new_sandbox_row
from tests.test_job_logs import LIMIT, finish, log_file, running

DAY = 24 * 3600
NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=10)
RECENT = NOW - timedelta(hours=1)


def point(at: datetime) -> MetricPoint:
    return MetricPoint(at=at, cpu_percent=1.0, memory_bytes=1, memory_peak_bytes=1, pids=1)


def dns(at: datetime) -> NetworkEvent:
    return NetworkEvent("dns", "denied", "no rule", name="example.test", at=at.timestamp())


def add_history(store: Store, sandbox_id: str) -> None:
    """Old and recent metric points and network events of a sandbox."""
    store.add_metric_points(sandbox_id, "10m", [point(OLD), point(RECENT)], keep=timedelta(days=99))
    store.append_network_events(sandbox_id, [dns(OLD), dns(RECENT)])


def sandbox(store: Store, team_name: str, state: str, at: datetime) -> str:
    """A sandbox row in `state` since `at`, with its history and an E2B row."""
    try:
        team = store.team(team_name)
    except Exception:
        team = store.create_team(team_name)
    row = new_sandbox_row(team, state=state, created_at=at, updated_at=at, last_activity_at=at)
    store.insert_sandbox(row)
    add_history(store, row.id)
    store.insert_e2b_sandbox(E2bSandboxRow(row.id, "", "test", "base", False))
    return row.id


def history(store: Store, sandbox_id: str) -> dict[str, Any]:
    return {
        "events": [e.at for e in store.events(sandbox_id)],
        "points": [p.at for p in store.metric_points(sandbox_id, "10m", limit=10)],
        "network": [r.at for r in store.network_events(sandbox_id)],
        "e2b": store.e2b_sandbox(sandbox_id) is not None,
    }


async def test_ended_sandboxes_past_their_age_go_with_everything_about_them(store: Store) -> None:
    old_killed = sandbox(store, "acme", "killed", OLD)
    old_failed = sandbox(store, "acme", "failed", OLD)
    recent_killed = sandbox(store, "acme", "killed", RECENT)
    old_running = sandbox(store, "acme", "running", OLD)
    old_paused = sandbox(store, "acme", "paused", OLD)

    retention = Retention(store, 0, sandbox_seconds=7 * DAY)
    assert await retention.sweep() == 2
    for gone in (old_killed, old_failed):
        assert store.sandbox(gone) is None
        assert history(store, gone) == {"events": [], "points": [], "network": [], "e2b": False}
    # Recent ones and live ones (paused included) stay, their history whole.
    for kept in (recent_killed, old_running, old_paused):
        assert store.sandbox(kept) is not None
        found = history(store, kept)
        assert len(found["points"]) == 2 and len(found["network"]) == 2 and found["e2b"]


async def test_old_events_and_metric_points_go_and_recent_ones_stay(store: Store) -> None:
    live = sandbox(store, "acme", "running", OLD)
    store.transition(live, "paused", "paused by the test", from_states=("running",))
    retention = Retention(store, 0, event_seconds=DAY, metric_seconds=DAY)
    # The old creation event, metric point and network event.
    assert await retention.sweep() == 3
    assert store.sandbox(live) is not None  # the sandbox itself is live: kept
    found = history(store, live)
    assert len(found["events"]) == 1 and found["events"][0] > NOW - timedelta(minutes=5)
    assert [at.timestamp() for at in found["points"]] == [RECENT.timestamp()]
    assert [at.timestamp() for at in found["network"]] == [pytest.approx(RECENT.timestamp())]
    # The per-sandbox count of deleted network events counts these too.
    assert store.network_events_dropped(live) == 1


async def test_a_backlog_goes_in_batches_while_the_store_answers_others(store: Store) -> None:
    live = sandbox(store, "acme", "running", RECENT)
    backlog = 2000
    with store._write() as conn:
        conn.execute(
            sandbox_events.insert(),
            [
                {"sandbox_id": live, "at": OLD, "from_state": None, "to_state": "running"}
                | {"reason": f"old {n}"}
                for n in range(backlog)
            ],
        )
    retention = Retention(store, 0, event_seconds=DAY, batch_rows=100, pause=0.01)
    sweep = asyncio.create_task(retention.sweep())
    # A handler's writes meanwhile, each in its own transaction: they get the write lock
    # between the sweep's batches, not after the whole backlog.
    batches_at_write = []
    made = 0
    while not sweep.done():
        made += 1
        await asyncio.to_thread(store.create_team, f"team-{made}")
        batches_at_write.append(retention.batches)
    assert await sweep == backlog + 1  # and the old creation event
    assert retention.batches >= backlog // 100
    assert any(0 < b < retention.batches for b in batches_at_write), batches_at_write
    assert [e.reason for e in store.events(live)] == ["created"]
    assert len(store.teams()) == made + 1


@pytest.mark.sqlite_only  # logs in files beside SQLite (PostgreSQL keeps them in rows)
async def test_a_sweep_removes_finished_jobs_log_files_with_their_rows(
    store: Store, store_settings: Settings
) -> None:
    team = store.create_team("acme")
    row, attempt = running(store, team)
    store.append_logs(attempt, [(0, 1, b"x" * 100_000)], LIMIT)
    finish(store, attempt)
    assert log_file(store_settings, row.id).exists()
    await asyncio.sleep(1.1)
    kept, kept_attempt = running(store, team)
    store.append_logs(kept_attempt, [(0, 1, b"y" * 100_000)], LIMIT)
    finish(store, kept_attempt)
    assert await Retention(store, 1).sweep() == 1
    assert store.job(row.id) is None and not log_file(store_settings, row.id).exists()
    assert store.job(kept.id) is not None and log_file(store_settings, kept.id).exists()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CORRAL_SANDBOX_RETENTION", "-1"),
        ("CORRAL_EVENT_RETENTION", "a week"),
        ("CORRAL_METRIC_RETENTION", "1.5"),
    ],
)
def test_a_bad_age_is_refused_naming_its_variable(variable: str, value: str) -> None:
    with pytest.raises(InvalidRequest, match=variable):
        Settings.from_env({variable: value})


def test_the_defaults_keep_a_week_of_sandboxes_and_a_month_of_events() -> None:
    settings = Settings()
    assert settings.sandbox_retention == 7 * DAY and settings.event_retention == 30 * DAY
    # At least the span of the longest metrics ring (24 hours).
    assert settings.metric_retention >= DAY
