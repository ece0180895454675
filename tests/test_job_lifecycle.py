"""The job lifecycle's named rules (`corral.job_lifecycle`), and the store's writes
following its diagram: every state a job is moved to is an arrow of `MOVES`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

from corral import job_lifecycle as life
from corral.states import JOB_FINAL_STATES, JOB_STATES
from corral.store import Store, Team
from corral.store.job_rows import Attempt, JobRow
from tests.conftest import new_job_row

ISOLATIONS = ("auto",)


def test_the_diagram_covers_every_state_and_finals_leave_only_by_retry() -> None:
    assert set(life.MOVES) == set(JOB_STATES)
    assert all(life.MOVES[final] == {"queued"} for final in JOB_FINAL_STATES)
    assert life.may_move("queued", "running") and life.may_move("running", "lost")
    assert not life.may_move("queued", "succeeded")  # a job ends only after it ran
    assert not life.may_move("succeeded", "running")  # a retry queues it first


def test_a_failure_is_retried_while_attempts_are_left_after_a_doubling_backoff() -> None:
    assert life.retries("failed", 1, 3) and life.retries("timed_out", 2, 3)
    assert not life.retries("failed", 3, 3)  # the last attempt
    assert not life.retries("canceled", 1, 3) and not life.retries("succeeded", 1, 3)
    assert [life.retry_delay(None, n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert life.retry_delay(0.5, 2) == 1.0
    assert life.retry_delay(10.0, 40) == life.MAX_BACKOFF_SECONDS


def test_lease_expiry_requeues_then_loses_and_a_waiting_cancel_wins() -> None:
    requeued = life.on_lease_expiry("w1", 1, 1, None, life.MAX_LOST)
    assert requeued == life.Move("queued", "requeued: worker w1 stopped heartbeating (attempt 1)")
    lost = life.on_lease_expiry("w3", 3, life.MAX_LOST, None, life.MAX_LOST)
    assert lost.state == "lost" and lost.final and f"{life.MAX_LOST} workers lost" in lost.reason
    canceled = life.on_lease_expiry("w1", 1, life.MAX_LOST, "enough", life.MAX_LOST)
    assert canceled.state == "canceled" and canceled.reason.startswith("canceled: enough; ")
    assert life.unspent(3) == 4  # a lost worker gives the attempt back


def test_cancel_heartbeat_release_and_room_rules() -> None:
    assert life.cancel_action("queued", False) == "cancel"
    assert life.cancel_action("running", False) == "mark"
    assert life.cancel_action("running", True) == "none"  # marked already
    assert life.cancel_action("failed", False) == "none"
    assert life.heartbeat_stop("running", "w1", "w1", False) is None
    assert life.heartbeat_stop("running", "w1", "w1", True) == "cancel"
    assert life.heartbeat_stop("running", "w2", "w1", True) == "lost"  # another's now
    assert life.heartbeat_stop("queued", None, "w1", False) == "lost"
    assert life.on_release(None, "shutting down") == life.Move("queued", "shutting down")
    assert life.on_release("enough", "shutting down") == life.Move("canceled", "canceled: enough")
    waits = [life.room_wait(n) for n in range(6)]
    assert waits == sorted(waits) and waits[0] == life.ROOM_WAIT_SECONDS
    assert waits[-1] == life.MAX_ROOM_WAIT_SECONDS


def _claim(store: Store, worker: str) -> tuple[JobRow, Attempt]:
    (row,) = store.claim_jobs(worker, ISOLATIONS, 1, 60)
    return row, Attempt(row.id, worker, row.attempt)


def test_the_stores_writes_follow_the_diagram(store: Store) -> None:
    """Every write that moves a job, in turn: each state event is an arrow of MOVES."""
    team: Team = store.create_team("acme")
    row, created = store.insert_job(new_job_row(team, max_attempts=2))
    assert created
    _, attempt = _claim(store, "w1")
    retry_at = datetime.now(UTC) - timedelta(seconds=1)
    store.end_attempt(attempt, "failed", "exit 1", exit_code=1, retry_at=retry_at)  # retried
    _, attempt = _claim(store, "w2")
    store.expire_worker("w2")
    store.expire_leases(life.MAX_LOST)  # requeued
    _, attempt = _claim(store, "w3")
    store.release_attempt(attempt, "shutting down")  # requeued, unspent
    _, attempt = _claim(store, "w4")
    store.end_attempt(attempt, "timed_out", "slow", exit_code=None)  # final
    store.retry_job(row.id)  # by request
    _, attempt = _claim(store, "w5")
    store.cancel_job(row.id, "enough")  # marked: the worker stops it
    store.release_attempt(attempt, "stopped")  # canceled
    store.retry_job(row.id)
    store.cancel_job(row.id, "again")  # queued: canceled at once
    states = [e.state for e in store.job_events(row.id) if e.type == "state" and e.state]
    assert states == [
        "queued", "running", "queued", "running", "queued", "running", "queued",
        "running", "timed_out", "queued", "running", "canceled", "queued", "canceled",
    ]  # fmt: skip
    assert all(life.may_move(a, b) for a, b in pairwise(states))
