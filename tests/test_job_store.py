"""The job queue in SQL, on real SQLite files and PostgreSQL: claims, leases, owned writes,
requeues, cancels and retries, the log cap, the callback outbox and List pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest
from corral.job_lifecycle import MAX_LOST
from corral.store import Store, Team
from corral.store.job_rows import Attempt, JobRow, NewEvent
from tests.conftest import new_job_row
from tests.kit.claimers import race_claims

ISOLATIONS = ("auto", "namespace")


@pytest.fixture
def team(store: Store) -> Team:
    return store.create_team("acme")


def submit(store: Store, team: Team, **changes: Any) -> JobRow:
    row, created = store.insert_job(new_job_row(team, **changes))
    assert created
    return row


def claim_one(store: Store, worker: str = "w1", lease: float = 60) -> JobRow:
    (row,) = store.claim_jobs(worker, ISOLATIONS, 1, lease)
    return row


def attempt_of(row: JobRow) -> Attempt:
    assert row.worker is not None
    return Attempt(row.id, row.worker, row.attempt)


def job(store: Store, job_id: str) -> JobRow:
    row = store.job(job_id)
    assert row is not None
    return row


def event_types(store: Store, job_id: str) -> list[tuple[str, str | None]]:
    return [(e.type, e.state) for e in store.job_events(job_id)]


def expire_now(store: Store, row: JobRow) -> None:
    """The worker of `row` died: its lease is made to run out."""
    assert row.worker is not None
    store.expire_worker(row.worker)


# -- submitting -----------------------------------------------------------------------------


def test_every_write_returns_the_row_as_stored_and_event_seqs_have_no_gaps(
    store: Store, team: Team
) -> None:
    """Writes return the row they wrote without reading it back: it must be the stored one."""
    row = submit(store, team, max_attempts=3, callback_url="http://127.0.0.1:9/")
    assert row == job(store, row.id)
    running = claim_one(store)
    assert running == job(store, row.id)
    owner, _ = store.append_logs(attempt_of(running), [(0, 1, b"x" * 10)], limit=4)  # truncates
    assert owner and store.add_events(attempt_of(running), [NewEvent("step_end", "s")])
    retry_at = datetime.now(UTC) - timedelta(seconds=1)
    ended = store.end_attempt(
        attempt_of(running), "failed", "exit 1", exit_code=1, retry_at=retry_at
    )
    assert ended is not None
    assert ended == job(store, row.id)
    running = claim_one(store, "w2")
    expire_now(store, running)
    (requeued,) = store.expire_leases(MAX_LOST)
    assert requeued == job(store, row.id)
    running = claim_one(store, "w3")
    released = store.release_attempt(attempt_of(running), "shutting down")
    assert released is not None and released == job(store, row.id)
    canceled = store.cancel_job(row.id, "enough")
    assert canceled is not None and canceled.state == "canceled"
    assert canceled == job(store, row.id)
    again = store.retry_job(row.id)
    assert again is not None and again.state == "queued" and again == job(store, row.id)
    seqs = [e.seq for e in store.job_events(row.id)]
    assert seqs == list(range(len(seqs))) and job(store, row.id).next_event_seq == len(seqs)
    assert event_types(store, row.id) == [
        ("state", "queued"),
        ("state", "running"),
        ("log_truncated", None),
        ("step_end", None),
        ("retry_scheduled", None),
        ("state", "queued"),
        ("state", "running"),
        ("state", "queued"),
        ("state", "running"),
        ("state", "queued"),
        ("state", "canceled"),
        ("state", "queued"),
    ]


def test_a_submitted_job_is_queued_with_its_first_event(store: Store, team: Team) -> None:
    row = submit(store, team)
    assert row.state == "queued" and row.attempt == 0 and row.next_event_seq == 1
    (event,) = store.job_events(row.id)
    assert (event.seq, event.type, event.state, event.attempt) == (0, "state", "queued", 0)


def test_an_idempotency_key_is_per_team(store: Store, team: Team) -> None:
    first = submit(store, team, idempotency_key="k1")
    again, created = store.insert_job(new_job_row(team, idempotency_key="k1", priority=9))
    assert not created and again.id == first.id and again.priority == 0
    other = store.create_team("other")
    theirs, created = store.insert_job(new_job_row(other, idempotency_key="k1"))
    assert created and theirs.id != first.id
    assert len(store.job_events(first.id)) == 1  # the second Submit recorded nothing


# -- claims ---------------------------------------------------------------------------------


def test_claims_take_the_highest_priority_then_the_oldest(store: Store, team: Team) -> None:
    now = datetime.now(UTC)
    ids = {
        name: submit(store, team, priority=priority, created_at=now - timedelta(seconds=age)).id
        for name, priority, age in [
            ("old-normal", 0, 30),
            ("urgent", 5, 1),
            ("new-normal", 0, 10),
            ("low", -1, 60),
            ("older-urgent", 5, 20),
        ]
    }
    order = [claim_one(store).id for _ in ids]
    assert order == [
        ids["older-urgent"],
        ids["urgent"],
        ids["old-normal"],
        ids["new-normal"],
        ids["low"],
    ]
    assert store.claim_jobs("w1", ISOLATIONS, 5, 60) == []


def test_one_claim_takes_several_in_order(store: Store, team: Team) -> None:
    now = datetime.now(UTC)
    a = submit(store, team, created_at=now - timedelta(seconds=3))
    b = submit(store, team, created_at=now - timedelta(seconds=2), priority=1)
    c = submit(store, team, created_at=now - timedelta(seconds=1))
    claimed = store.claim_jobs("w1", ISOLATIONS, 2, 60)
    assert [r.id for r in claimed] == [b.id, a.id]
    assert [r.id for r in store.claim_jobs("w1", ISOLATIONS, 2, 60)] == [c.id]


def test_a_claim_starts_an_attempt_under_a_lease(store: Store, team: Team) -> None:
    row = submit(store, team)
    before = datetime.now(UTC)
    claimed = claim_one(store, "w1", lease=30)
    assert claimed.state == "running" and claimed.attempt == 1 and claimed.worker == "w1"
    assert claimed.lease_expires_at is not None
    assert before + timedelta(seconds=29) < claimed.lease_expires_at
    assert claimed.lease_expires_at < before + timedelta(seconds=32)
    assert event_types(store, row.id) == [("state", "queued"), ("state", "running")]
    assert store.running_workers() == ["w1"]


def test_a_job_is_not_claimed_before_its_run_after(store: Store, team: Team) -> None:
    later = submit(store, team, run_after=datetime.now(UTC) + timedelta(seconds=60))
    due = submit(store, team, run_after=datetime.now(UTC) - timedelta(seconds=1), priority=-5)
    assert [r.id for r in store.claim_jobs("w1", ISOLATIONS, 10, 60)] == [due.id]
    assert job(store, later.id).state == "queued"


def test_only_the_listed_isolations_are_claimed(store: Store, team: Team) -> None:
    gvisor = submit(store, team, isolation="gvisor")
    namespace = submit(store, team, isolation="namespace")
    auto = submit(store, team, isolation="auto")
    claimed = {r.id for r in store.claim_jobs("w1", ISOLATIONS, 10, 60)}
    assert claimed == {namespace.id, auto.id}
    assert job(store, gvisor.id).state == "queued"
    assert [r.id for r in store.claim_jobs("w2", ("gvisor",), 10, 60)] == [gvisor.id]


def test_two_stores_never_claim_the_same_job(
    store: Store, team: Team, store_settings: Settings
) -> None:
    """Two processes' stores on one file, each with threads claiming as fast as they can."""
    total = 120
    team = store.create_team("many", max_running_jobs=total)  # no cap in the way
    for _ in range(total):
        submit(store, team)
    claims = {
        name: [row.id for row in rows]
        for name, rows in race_claims(store, store_settings, ISOLATIONS).items()
    }
    every = [job_id for got in claims.values() for job_id in got]
    assert len(every) == total and len(set(every)) == total
    assert sum(1 for got in claims.values() if got) >= 2  # they really raced
    for name, got in claims.items():
        for job_id in got:
            row = job(store, job_id)
            assert (row.worker, row.attempt, row.state) == (name, 1, "running")


# -- heartbeats and owned writes ------------------------------------------------------------


def test_a_heartbeat_extends_the_lease_and_says_what_to_stop(store: Store, team: Team) -> None:
    kept = submit(store, team)
    canceled = submit(store, team)
    for _ in range(2):
        claim_one(store, "w1", lease=5)
    lease_before = job(store, kept.id).lease_expires_at
    assert lease_before is not None
    assert store.heartbeat("w1", [kept.id, canceled.id], 60) == {}
    extended = job(store, kept.id).lease_expires_at
    assert extended is not None and extended > lease_before + timedelta(seconds=50)

    store.cancel_job(canceled.id, "enough")
    stops = store.heartbeat("w1", [kept.id, canceled.id, "j-unknown"], 60)
    assert stops == {canceled.id: "cancel", "j-unknown": "lost"}
    lease_after = job(store, kept.id).lease_expires_at
    # Another worker's heartbeat for this worker's job: not theirs, and no lease change.
    assert store.heartbeat("w2", [kept.id], 3600) == {kept.id: "lost"}
    assert job(store, kept.id).lease_expires_at == lease_after
    assert store.heartbeat("w1", [], 60) == {}


def test_a_heartbeat_after_a_requeue_says_lost(store: Store, team: Team) -> None:
    row = submit(store, team)
    running = claim_one(store, "w1")
    expire_now(store, running)
    (requeued,) = store.expire_leases(MAX_LOST)
    assert requeued.state == "queued"
    assert store.heartbeat("w1", [row.id], 60) == {row.id: "lost"}
    assert job(store, row.id).lease_expires_at is None


def test_writes_of_a_stale_attempt_change_nothing(store: Store, team: Team) -> None:
    row = submit(store, team)
    first = attempt_of(claim_one(store, "w1"))
    assert store.append_logs(first, [(0, 1, b"one\n")], 1 << 20) == (True, 0)
    assert store.add_events(first, [NewEvent("step_start", "step 1")])
    expire_now(store, job(store, row.id))
    store.expire_leases(MAX_LOST)
    before = job(store, row.id)
    logs = store.job_logs(row.id)
    events = store.job_events(row.id)

    # The dead worker comes back: every write of its attempt is refused.
    assert store.append_logs(first, [(0, 1, b"two\n")], 1 << 20) == (False, 0)
    assert store.add_events(first, [NewEvent("step_end", "done")]) is False
    assert store.end_attempt(first, "succeeded", "done", exit_code=0) is None
    assert store.release_attempt(first, "bye") is None
    assert job(store, row.id) == before
    assert store.job_logs(row.id) == logs and store.job_events(row.id) == events

    # Still refused once a successor runs — even on the same worker name.
    second = attempt_of(claim_one(store, "w1"))
    assert second.attempt == 2
    assert store.append_logs(first, [(0, 1, b"late\n")], 1 << 20) == (False, 0)
    assert store.end_attempt(first, "failed", "late", exit_code=1) is None
    assert store.append_logs(second, [(0, 1, b"two\n")], 1 << 20) == (True, 0)
    ended = store.end_attempt(second, "succeeded", "done", exit_code=0)
    assert ended is not None and ended.state == "succeeded" and ended.exit_code == 0
    assert [(c.seq, c.attempt, c.data) for c in store.job_logs(row.id)] == [
        (0, 1, b"one\n"),
        (1, 2, b"two\n"),
    ]
    # A finished attempt's writes are refused too.
    assert store.add_events(second, [NewEvent("step_end", "again")]) is False


def test_expired_leases_requeue_then_give_up_after_max_lost(store: Store, team: Team) -> None:
    row = submit(store, team, max_attempts=2)
    for lost in range(1, MAX_LOST):
        running = claim_one(store, f"w{lost}")
        assert running.attempt == lost
        assert store.expire_leases(MAX_LOST) == []  # the lease has not run out yet
        expire_now(store, running)
        (changed,) = store.expire_leases(MAX_LOST)
        assert changed.state == "queued" and changed.lost_count == lost
        assert changed.worker == f"w{lost}" and changed.finished_at is None  # its last worker
        assert f"worker w{lost} stopped heartbeating" in changed.state_reason
        # A lost worker does not spend one of the job's retries.
        assert changed.max_attempts == 2 + lost
    running = claim_one(store, "w-last")
    expire_now(store, running)
    (gone,) = store.expire_leases(MAX_LOST)
    assert gone.state == "lost" and gone.finished_at is not None
    assert "giving up" in gone.state_reason
    assert gone.lost_count == MAX_LOST
    states = [s for t, s in event_types(store, row.id) if t == "state"]
    assert states == ["queued"] + ["running", "queued"] * (MAX_LOST - 1) + ["running", "lost"]
    assert store.claim_jobs("w1", ISOLATIONS, 10, 60) == []


def test_an_expired_lease_with_a_cancel_waiting_is_canceled(store: Store, team: Team) -> None:
    row = submit(store, team)
    running = claim_one(store)
    store.cancel_job(row.id, "stop it")
    expire_now(store, running)
    (changed,) = store.expire_leases(MAX_LOST)
    assert changed.state == "canceled" and "stop it" in changed.state_reason
    assert changed.finished_at is not None


def test_a_lease_of_a_live_worker_is_not_expired(store: Store, team: Team) -> None:
    submit(store, team)
    running = claim_one(store, lease=60)
    assert store.expire_leases(MAX_LOST) == []
    assert job(store, running.id).state == "running"


# -- ends, retries, cancels, releases -------------------------------------------------------


def test_an_attempt_ends_with_a_retry_at_then_runs_again(store: Store, team: Team) -> None:
    row = submit(store, team, max_attempts=2)
    first = attempt_of(claim_one(store))
    retry_at = datetime.now(UTC) + timedelta(seconds=60)
    queued = store.end_attempt(first, "failed", "exit 1", exit_code=1, retry_at=retry_at)
    assert queued is not None and queued.state == "queued" and queued.run_after == retry_at
    assert queued.finished_at is None and queued.exit_code == 1
    # The first retry of the one the job has.
    assert queued.state_reason == "retry 1 of 1"
    assert store.claim_jobs("w1", ISOLATIONS, 1, 60) == []  # not before retry_at
    types = event_types(store, row.id)
    assert types[-2:] == [("retry_scheduled", None), ("state", "queued")]
    retry_event = store.job_events(row.id)[-2]
    assert retry_event.data["exit_code"] == 1 and retry_event.attempt == 1


def test_retry_job_queues_a_finished_job_for_one_more_attempt(store: Store, team: Team) -> None:
    row = submit(store, team)
    attempt = attempt_of(claim_one(store))
    store.end_attempt(attempt, "failed", "exit 1", exit_code=1)
    retried = store.retry_job(row.id)
    assert retried is not None
    assert retried.state == "queued" and retried.max_attempts == 2
    assert retried.finished_at is None and retried.cancel_reason is None
    assert "after failed" in retried.state_reason
    again = claim_one(store)
    assert again.id == row.id and again.attempt == 2 and again.exit_code is None
    # Not finished: unchanged. Unknown: None.
    assert store.retry_job(row.id) == job(store, row.id)
    assert job(store, row.id).state == "running"
    assert store.retry_job("j-unknown") is None


def test_retry_job_after_a_cancel_clears_the_cancel(store: Store, team: Team) -> None:
    row = submit(store, team)
    store.cancel_job(row.id, "oops")
    retried = store.retry_job(row.id)
    assert retried is not None and retried.cancel_reason is None
    running = claim_one(store)
    assert store.heartbeat(running.worker or "", [row.id], 60) == {}


def test_cancel_of_a_queued_job_is_at_once(store: Store, team: Team) -> None:
    row = submit(store, team)
    canceled = store.cancel_job(row.id, "not needed")
    assert canceled is not None and canceled.state == "canceled"
    assert canceled.state_reason == "canceled: not needed" and canceled.finished_at is not None
    assert event_types(store, row.id)[-1] == ("state", "canceled")
    assert store.claim_jobs("w1", ISOLATIONS, 10, 60) == []
    assert store.cancel_job("j-unknown", "x") is None


def test_cancel_of_a_running_job_is_left_to_its_worker(store: Store, team: Team) -> None:
    row = submit(store, team)
    running = claim_one(store)
    marked = store.cancel_job(row.id, "first")
    assert marked is not None and marked.state == "running" and marked.cancel_reason == "first"
    again = store.cancel_job(row.id, "second")
    assert again is not None and again.cancel_reason == "first"
    assert event_types(store, row.id)[-1] == ("state", "running")  # no event until it stops
    ended = store.end_attempt(attempt_of(running), "canceled", "canceled: first", exit_code=None)
    assert ended is not None and ended.state == "canceled"
    # A finished job: nothing changes.
    assert store.cancel_job(row.id, "third") == job(store, row.id)


def test_release_attempt_requeues_without_spending_a_retry(store: Store, team: Team) -> None:
    row = submit(store, team)
    first = attempt_of(claim_one(store))
    store.append_logs(first, [(0, 1, b"partial")], 1 << 20)
    released = store.release_attempt(first, "requeued: its worker shut down")
    assert released is not None and released.id == row.id and released.state == "queued"
    assert released.state_reason == "requeued: its worker shut down"
    assert released.attempt == 1 and released.max_attempts == 2 and released.worker == "w1"
    again = claim_one(store, "w2")
    assert again.attempt == 2


def test_release_attempt_of_a_canceled_job_cancels_it(store: Store, team: Team) -> None:
    row = submit(store, team)
    attempt = attempt_of(claim_one(store))
    store.cancel_job(row.id, "bye")
    released = store.release_attempt(attempt, "requeued: its worker shut down")
    assert released is not None and released.state == "canceled"
    assert released.max_attempts == 1 and released.finished_at is not None


# -- the log cap ----------------------------------------------------------------------------


def test_output_past_the_limit_is_dropped_with_one_event(store: Store, team: Team) -> None:
    row = submit(store, team)
    attempt = attempt_of(claim_one(store))
    assert store.append_logs(attempt, [(0, 1, b"12345678")], 10) == (True, 0)
    assert store.append_logs(attempt, [(0, 2, b"abcdef"), (0, 1, b"gh")], 10) == (True, 6)
    assert store.append_logs(attempt, [(1, 1, b"more")], 10) == (True, 4)
    chunks = store.job_logs(row.id)
    assert [(c.seq, c.stream, c.data) for c in chunks] == [(0, 1, b"12345678"), (1, 2, b"ab")]
    after = job(store, row.id)
    assert after.log_bytes == 10 and after.log_truncated and after.next_log_seq == 2
    truncated = [e for e in store.job_events(row.id) if e.type == "log_truncated"]
    assert len(truncated) == 1 and truncated[0].data == {"limit_bytes": 10}


def test_log_seqs_continue_across_attempts(store: Store, team: Team) -> None:
    row = submit(store, team, max_attempts=2)
    first = attempt_of(claim_one(store))
    store.append_logs(first, [(0, 1, b"a"), (0, 2, b"b")], 100)
    store.end_attempt(
        first, "failed", "exit 1", exit_code=1, retry_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    second = attempt_of(claim_one(store))
    store.append_logs(second, [(0, 1, b"c")], 100)
    assert [(c.seq, c.attempt) for c in store.job_logs(row.id)] == [(0, 1), (1, 1), (2, 2)]
    assert [c.seq for c in store.job_logs(row.id, offset=2)] == [2]


# -- the callback outbox --------------------------------------------------------------------


def outbox(store: Store) -> list[tuple[str, str, bool]]:
    """Every pending delivery as (job, event type, critical); taking them holds them."""
    return [
        (r.job_id, r.payload["type"], r.critical)
        for r in store.due_callbacks(limit=10_000, hold=600)
    ]


def test_callback_rows_are_made_only_for_jobs_with_a_url(store: Store, team: Team) -> None:
    silent = submit(store, team, max_attempts=2)
    hooked = submit(store, team, callback_url="http://127.0.0.1:9/hook", callback_secret="s")
    failing = submit(store, team, callback_url="http://127.0.0.1:9/hook", callback_secret="s")
    for _ in range(3):
        attempt = attempt_of(claim_one(store))
        store.add_events(
            attempt,
            [NewEvent("step_start", "s"), NewEvent("step_end", "e", None, {"exit_code": 0})],
        )
        ok = attempt.job_id != failing.id
        store.end_attempt(attempt, "succeeded" if ok else "failed", "end", exit_code=int(not ok))
    rows = outbox(store)
    assert all(job_id != silent.id for job_id, _, _ in rows)
    for row, final in [(hooked, "done"), (failing, "error")]:
        mine = [(kind, critical) for job_id, kind, critical in rows if job_id == row.id]
        assert mine == [
            ("state", False),  # queued
            ("state", False),  # running
            ("step_start", False),
            ("step_end", True),
            ("state", False),  # the final state …
            (final, True),  # … and the done/error a receiver waits for
        ]
    counts = store.callback_counts([silent.id, hooked.id, failing.id])
    assert silent.id not in counts and counts[hooked.id].pending == 6


def test_a_retry_scheduled_is_not_a_final_callback(store: Store, team: Team) -> None:
    row = submit(
        store, team, max_attempts=2, callback_url="http://127.0.0.1:9/", callback_secret="s"
    )
    attempt = attempt_of(claim_one(store))
    store.end_attempt(
        attempt, "failed", "exit 1", exit_code=1, retry_at=datetime.now(UTC) + timedelta(hours=1)
    )
    kinds = [kind for job_id, kind, _ in outbox(store) if job_id == row.id]
    assert kinds == ["state", "state", "retry_scheduled", "state"]


# -- List -----------------------------------------------------------------------------------


def test_list_pages_newest_first_with_tokens(store: Store, team: Team) -> None:
    now = datetime.now(UTC)
    made = [submit(store, team, created_at=now - timedelta(seconds=100 - i)) for i in range(25)]
    # Same created_at: ties are broken by id, still without gaps or repeats.
    tied = [submit(store, team, created_at=now) for _ in range(5)]
    other = store.create_team("other")
    submit(store, other)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        rows, token = store.list_jobs(team.id, page_size=7, page_token=token)
        seen.extend(r.id for r in rows)
        pages += 1
        if not token:
            break
    assert pages == 5
    assert len(seen) == 30 and len(set(seen)) == 30
    assert set(seen[:5]) == {r.id for r in tied}
    assert seen[5:] == [r.id for r in reversed(made)]


def test_list_filters_by_state_label_and_template(store: Store, team: Team) -> None:
    web = submit(store, team, labels={"app.kubernetes.io/name": "web", "env": "prod"})
    submit(store, team, labels={"app.kubernetes.io/name": "db", "env": "prod"})
    other_template = submit(store, team, template="python", labels={"env": "prod"})
    running = claim_one(store)

    def ids(**filters: Any) -> set[str]:
        rows, token = store.list_jobs(team.id, **filters)
        assert token == ""
        return {r.id for r in rows}

    assert ids(labels={"app.kubernetes.io/name": "web"}) == {web.id}
    assert ids(labels={"env": "prod", "app.kubernetes.io/name": "web"}) == {web.id}
    assert len(ids(labels={"env": "prod"})) == 3
    assert ids(labels={"env": "dev"}) == set()
    assert ids(template="python") == {other_template.id}
    assert ids(states=["running"]) == {running.id}
    assert len(ids(states=["queued", "running"])) == 3
    assert ids(states=["failed"]) == set()


@pytest.mark.parametrize("token", ["garbage", "e30", "W10", "WyJ4IiwgMV0"])
def test_a_bad_page_token_is_refused(store: Store, team: Team, token: str) -> None:
    with pytest.raises(InvalidRequest, match="page_token"):
        store.list_jobs(team.id, page_token=token)
