"""Job callbacks end to end: a real SQLite store, a real HTTP receiver on a free port."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Callable

import pytest

from corral.jobs.callbacks import INTERNAL_FAILED, CallbackDispatcher
from corral.jobs.signing import sign, verify
from corral.store import Store, Team
from corral.store.callback_outbox import CALLBACK_ATTEMPTS, CallbackCounts
from corral.store.job_rows import Attempt, NewEvent
from tests.conftest import new_job_row
from tests.kit.http import CallbackReceiver, EndlessReplies, SilentReceiver
from tests.kit.polling import until

SECRET = "s3cret-for-tests"
WORKER = "worker-1"


def submit(
    store: Store, url: str | None, secret: str | None = SECRET, team: Team | None = None
) -> str:
    team = team or store.ensure_default_team()[0]
    row = new_job_row(
        team,
        template="default",
        isolation="process",
        spec={},
        callback_url=url,
        callback_secret=secret,
    )
    store.insert_job(row)
    return row.id


def start(store: Store, job_id: str) -> Attempt:
    (claimed,) = [r for r in store.claim_jobs(WORKER, ["process"], 10, 60) if r.id == job_id]
    return Attempt(job_id, WORKER, claimed.attempt)


def finish(store: Store, attempt: Attempt, *, ok: bool = True) -> None:
    """What a worker records for a one-step job: the step, then the end of the attempt."""
    code = 0 if ok else 1
    steps = [NewEvent("step_start", "step 0"), NewEvent("step_end", f"exit {code}", None, {})]
    assert store.add_events(attempt, steps)
    state = "succeeded" if ok else "failed"
    assert store.end_attempt(attempt, state, f"exit {code}", exit_code=code) is not None


def run_job(
    store: Store,
    url: str | None,
    *,
    ok: bool = True,
    secret: str | None = SECRET,
    team: Team | None = None,
) -> str:
    job_id = submit(store, url, secret, team)
    finish(store, start(store, job_id), ok=ok)
    return job_id


# Deliveries of a one-step job, in order: the state events, the step, the final state.
OK_TYPES = ["state", "state", "step_start", "step_end", "state", "done"]
FAILED_TYPES = ["state", "state", "step_start", "step_end", "state", "error"]


# -- delivery -------------------------------------------------------------------------------


async def test_every_event_is_posted_once_in_order_and_signed(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    failed = run_job(store, receiver.url, ok=False)
    ok = submit(store, receiver.url)
    attempt = start(store, ok)
    dispatcher = dispatchers(interval=3600)  # the store's wake-ups send, not its poll
    dispatcher.start()
    await until(lambda: len(receiver.requests()) == 6 + 2, "the first pass")
    finish(store, attempt)
    await until(lambda: len(receiver.requests()) == 6 + 6, "the woken pass")

    requests = receiver.requests()
    assert len({r.delivery for r in requests}) == len(requests)  # each one once
    for job_id, types in ((ok, OK_TYPES), (failed, FAILED_TYPES)):
        mine = [r for r in requests if r.headers["x-corral-job"] == job_id]
        assert [r.payload["type"] for r in mine] == types
        assert [r.payload["seq"] for r in mine] == [0, 1, 2, 3, 4, 4]
        assert [r.delivery for r in mine] == sorted(r.delivery for r in mine)
    done = next(r for r in requests if r.payload["type"] == "done")
    assert done.payload["job_id"] == ok and done.payload["state"] == "succeeded"
    error = next(r for r in requests if r.payload["type"] == "error")
    assert error.payload["job_id"] == failed and error.payload["state"] == "failed"

    for r in requests:
        assert "authorization" not in r.headers
        assert r.headers["content-type"] == "application/json"
        assert r.headers["user-agent"].startswith("corral/")
        assert r.headers["x-corral-event"] == r.payload["type"]
        signature = r.headers["x-corral-signature"]
        assert verify(SECRET, signature, r.body)
        assert not verify("not-the-secret", signature, r.body)
        assert not verify(SECRET, signature, r.body.replace(b'"seq":', b'"seq":9'))
        signed_at = int(signature.split(",")[0].removeprefix("t="))
        assert not verify(SECRET, signature, r.body, now=signed_at + 301)

    # The receiver records a POST before it replies, the dispatcher the reply after.
    await until(
        lambda: all(c.delivered == 6 for c in store.callback_counts([ok, failed]).values()),
        "the replies to be recorded",
    )
    counts = store.callback_counts([ok, failed])
    assert counts[ok].pending == counts[failed].pending == 0
    assert counts[ok].last_error == ""


async def test_deliveries_owed_in_this_process_wake_its_dispatcher_at_once(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    """No poll within the test (an hour) and no wake(): each commit that owes deliveries
    wakes the dispatcher of its own process, on either database."""
    dispatchers(interval=3600).start()
    job_id = submit(store, receiver.url)
    await until(
        lambda: store.callback_counts([job_id]).get(job_id, CallbackCounts()).delivered == 1,
        "the queued event's delivery",
    )
    attempt = start(store, job_id)  # the dispatcher is idle again: only a wake-up sends
    await until(lambda: len(receiver.requests()) == 2, "the running event's POST")
    finish(store, attempt)
    await until(lambda: store.callback_counts([job_id])[job_id].delivered == 6, "deliveries")
    assert [r.payload["type"] for r in receiver.requests()] == OK_TYPES


async def test_a_retry_goes_out_when_it_comes_due_not_at_the_next_poll(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    """Nothing announces a backoff's end: the dispatcher sleeps until the first pending
    delivery comes due (its poll, an hour, never comes within the test)."""
    receiver.fail_first = 1
    job_id = run_job(store, receiver.url)
    dispatchers(interval=3600, backoff=0.5, max_backoff=0.5).start()
    await until(lambda: store.callback_counts([job_id])[job_id].delivered == 6, "the retries")
    by_type = {r.payload["type"]: r.delivery for r in receiver.requests()}
    tries = receiver.tries()
    assert tries[by_type["step_end"]] == tries[by_type["done"]] == 2


async def test_critical_events_are_retried_until_the_receiver_takes_them(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    receiver.fail_first = 3
    job_id = run_job(store, receiver.url)
    dispatchers().start()
    await until(lambda: store.callback_counts([job_id])[job_id].delivered == 6, "deliveries")

    by_type = {r.payload["type"]: r.delivery for r in receiver.requests()}
    tries = receiver.tries()
    assert tries[by_type["step_end"]] == tries[by_type["done"]] == 4
    assert tries[by_type["step_start"]] == 1
    assert sum(tries.values()) == 4 + 4 + 4
    counts = store.callback_counts([job_id])[job_id]
    # The receiver is internal (allowed on loopback): the tenant is not told how it failed.
    assert (counts.pending, counts.failed, counts.last_error) == (0, 0, INTERNAL_FAILED)


async def test_a_receiver_that_always_fails_gets_ten_tries_for_critical_events(
    store: Store,
    receiver: CallbackReceiver,
    dispatchers: Callable[..., CallbackDispatcher],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "corral.jobs.callbacks")
    receiver.fail_all = True
    job_id = run_job(store, receiver.url, ok=False)
    dispatcher = dispatchers(backoff=0.001, max_backoff=0.01)
    dispatcher.start()
    await until(lambda: store.callback_counts([job_id])[job_id].pending == 0, "giving up")

    tries = receiver.tries()
    for r in receiver.requests():
        expected = CALLBACK_ATTEMPTS if r.payload["type"] in ("step_end", "error") else 1
        assert tries[r.delivery] == expected, r.payload["type"]
    assert len(tries) == 6
    counts = store.callback_counts([job_id])[job_id]
    assert (counts.delivered, counts.failed, counts.last_error) == (0, 6, INTERNAL_FAILED)
    assert await dispatcher.deliver_due() == 0  # nothing is left to send
    # The operator's log has what the tenant is not told.
    assert "callback to an internal address failed: HTTP 500" in caplog.text


async def test_unreachable_receivers_and_jobs_without_a_secret_fail_with_a_reason(
    store: Store, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"  # bound, not listening
    unreachable = run_job(store, closed)
    secretless = run_job(store, closed, secret=None)
    dispatchers(backoff=0.001, max_backoff=0.01).start()
    await until(
        lambda: all(
            c.pending == 0 for c in store.callback_counts([unreachable, secretless]).values()
        ),
        "giving up",
    )
    counts = store.callback_counts([unreachable, secretless])
    assert counts[unreachable].failed == 6
    assert counts[unreachable].last_error == INTERNAL_FAILED  # not "ConnectError: refused"
    assert counts[secretless].failed == 6
    assert counts[secretless].last_error == "job has no callback URL or secret"


async def test_rows_cut_short_by_a_stop_are_sent_again_after_the_hold(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    receiver.open.clear()  # the receiver sits on every request
    job_id = run_job(store, receiver.url)
    first = dispatchers(timeout=2.0, hold=2.5)
    first.start()
    await until(lambda: len(receiver.requests()) == 1, "the first POST to arrive")
    await first.aclose()
    # The job's rows go one after another: only the first one was on its way.
    assert store.callback_counts([job_id])[job_id].pending == 6

    receiver.open.set()
    second = dispatchers(timeout=2.0, hold=2.5)
    assert await second.deliver_due() == 0  # still held by the first dispatcher's claim
    second.start()
    await until(lambda: store.callback_counts([job_id])[job_id].delivered == 6, "the resend")

    requests = receiver.requests()
    assert [r.payload["type"] for r in requests] == [OK_TYPES[0], *OK_TYPES]
    assert requests[0].delivery == requests[1].delivery  # at least once: sent twice
    assert len(receiver.tries()) == 6


# -- fairness -------------------------------------------------------------------------------


async def test_a_receiver_that_never_answers_delays_only_its_own_callbacks(
    store: Store, receiver: CallbackReceiver, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    # Issue 9, finding 4: 40 jobs of one team calling back to an endpoint that never
    # answers held another team's callback back by minutes, because a pass claimed the
    # oldest rows (all theirs) and waited for every POST of the pass to time out.
    silent = SilentReceiver()
    try:
        stalled = [run_job(store, silent.url) for _ in range(40)]
        other = store.create_team(f"other-{secrets.token_hex(3)}")
        healthy = run_job(store, receiver.url, team=other)
        dispatchers(timeout=5.0, hold=10.0, per_destination=4).start()

        await until(
            lambda: store.callback_counts([healthy])[healthy].delivered == 6,
            "the healthy receiver's deliveries",
        )
        # Delivered while the stalled POSTs still wait for their timeout: none has ended
        # (a timed-out row is failed, or pending again with an error) ...
        counts = store.callback_counts(stalled)
        connections = len(silent.accepted)
        assert all((c.delivered, c.failed, c.last_error) == (0, 0, "") for c in counts.values())
        # ... no more than 4 at once to one host:port (none has timed out yet, so each
        # connection so far is still open), and they were under way meanwhile.
        assert connections <= 4
        await until(lambda: len(silent.accepted) >= 1, "the stalled POSTs", timeout=3)
        assert [r.payload["type"] for r in receiver.requests()] == OK_TYPES
    finally:
        silent.close()


async def test_the_total_bound_holds_every_flight(
    store: Store, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    silents = [SilentReceiver() for _ in range(3)]
    try:
        for silent in silents:
            for _ in range(3):
                run_job(store, silent.url)
        dispatcher = dispatchers(timeout=5.0, hold=10.0, concurrency=5, per_destination=2)
        dispatcher.start()
        await until(lambda: sum(len(s.accepted) for s in silents) == 5, "five POSTs")
        await asyncio.sleep(0.5)  # room for a sixth, were the bound not kept
        assert sum(len(s.accepted) for s in silents) == 5
        assert all(len(s.accepted) <= 2 for s in silents)
    finally:
        for silent in silents:
            silent.close()


async def test_a_reply_body_is_never_read(
    store: Store, dispatchers: Callable[..., CallbackDispatcher]
) -> None:
    # A receiver could answer with gigabytes: the status is the acknowledgement.
    endless = EndlessReplies()
    try:
        job_id = run_job(store, endless.url)
        dispatchers(timeout=5.0).start()
        await until(lambda: store.callback_counts([job_id])[job_id].delivered == 6, "deliveries")
        assert store.callback_counts([job_id])[job_id].last_error == ""
    finally:
        endless.close()


# -- signatures -----------------------------------------------------------------------------


def test_sign_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"type":"done"}'
    digest = hmac.new(b"key", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("key", body, 1700000000) == f"t=1700000000,v1={digest}"
    assert verify("key", sign("key", body, 1700000000), body, now=1700000000 + 299)
    assert verify("key", f"t=1700000000,v1=00,v1={digest}", body, now=1700000000)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "t=1700000000",  # no signature
        "v1={digest}",  # no timestamp
        "t=soon,v1={digest}",
        "t=1700000000,v1",
        "t=1700000000,v1={digest}x",
        "t=1700000000,v2={digest}",  # an unknown scheme is not v1
        "t=1699999000,v1={digest}",  # right signature of another time
        "t=1700000000,v1=\u00e9{digest}",  # not ASCII
        "t=1700000000,,v1={digest}",
    ],
)
def test_verify_refuses_malformed_headers(header: str) -> None:
    body = b"{}"
    digest = sign("key", body, 1700000000).split("v1=")[1]
    assert not verify("key", header.format(digest=digest), body, now=1700000000)


def test_verify_refuses_timestamps_outside_the_tolerance() -> None:
    header = sign("key", b"{}", 1700000000)
    assert not verify("key", header, b"{}", now=1700000000 + 301)
    assert not verify("key", header, b"{}", now=1700000000 - 301)  # from the future
    assert verify("key", header, b"{}", now=1700000000 + 30, tolerance=60)


def test_a_hold_no_longer_than_the_timeout_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="hold"):
        CallbackDispatcher(store, timeout=10, hold=10)
