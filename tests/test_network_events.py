"""Network events: rate limited in memory, stored per sandbox under a cap, shown in the
job's event stream, read through the API, the SDK and the CLI."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from corral.client import AsyncSandbox, Sandbox
from corral.config import Settings
from corral.errors import InvalidRequest, NotFound
from corral.isolation import Engine
from corral.isolation import Sandbox as IsolatedSandbox
from corral.jobs.queue import JobQueue, JobSignals
from corral.jobs.spec import JobSpec
from corral.jobs.worker import Worker
from corral.network.events import NetworkEvent, NetworkEventLog
from corral.sandboxes import CreateOptions
from corral.sandboxes.network_events import NetworkEventPump
from corral.store import Store, Team
from corral.store.job_rows import NewEvent
from tests.conftest import LiveServer, StartManager, new_sandbox_row, opts
from tests.kit.connect import stream
from tests.kit.polling import until
from tests.test_job_store import attempt_of, claim_one, job, submit

DENIED = NetworkEvent("connect", "denied", "private", "tcp", "10.99.0.10", 80)


@pytest.fixture
def team(store: Store) -> Team:
    return store.create_team("acme")


def connect(port: int, decision: str = "denied") -> NetworkEvent:
    return replace(DENIED, port=port, decision=decision)


# -- rate limiting ------------------------------------------------------------------------


async def test_a_flood_of_denied_events_is_stored_as_few_rows_with_exact_counts(
    store: Store,
) -> None:
    log = NetworkEventLog()
    for i in range(100_000):
        log.add(connect(i % 65536, "denied"))
    store.append_network_events("sb_flood", await log.next_batch())

    rows = store.network_events("sb_flood")
    kept = [r for r in rows if r.kind != "suppressed"]
    suppressed = [r for r in rows if r.kind == "suppressed"]
    assert len(rows) < 1000, "the flood must not become one row per attempt"
    assert kept and suppressed
    # Nothing lost: every attempt is a row or in a suppressed row's count.
    assert len(kept) + sum(r.count for r in suppressed) == 100_000
    assert {(r.decision, r.rule) for r in suppressed} == {("denied", "private")}


async def test_suppressed_counts_are_per_decision_and_rule() -> None:
    log = NetworkEventLog(burst=1, rate=0.0)
    log.add(connect(1))
    for _ in range(5):
        log.add(connect(2))
    for _ in range(3):
        log.add(replace(connect(3, "allowed"), rule="internet"))
    batch = await log.next_batch()
    assert batch[0] == connect(1)
    assert Counter({(e.decision, e.rule): e.count for e in batch[1:]}) == {
        ("denied", "private"): 5,
        ("allowed", "internet"): 3,
    }
    assert all(e.kind == "suppressed" and e.name == "connect" for e in batch[1:])
    assert log.take() == []


# -- the store ------------------------------------------------------------------------------


def test_events_are_appended_in_order_and_read_after_a_cursor(store: Store) -> None:
    dns = NetworkEvent(
        "dns", "allowed", "allowed.test", name="allowed.test", answers=("192.0.2.10",)
    )
    store.append_network_events("sb_a", [dns, connect(443, "allowed")])
    store.append_network_events("sb_a", [connect(22)])
    store.append_network_events("sb_b", [connect(25)])

    rows = store.network_events("sb_a")
    assert [r.seq for r in rows] == [0, 1, 2]
    assert rows[0].kind == "dns" and rows[0].answers == ("192.0.2.10",)
    assert rows[0].name == "allowed.test" and rows[0].job_id is None
    assert [(r.decision, r.port) for r in rows[1:]] == [("allowed", 443), ("denied", 22)]
    assert [r.seq for r in store.network_events("sb_a", offset=2)] == [2]
    assert store.network_events("sb_a", offset=3) == []
    assert [r.port for r in store.network_events("sb_b")] == [25]


def test_past_the_cap_the_oldest_go_and_the_count_of_those_dropped_is_kept(
    store_settings: Settings,
) -> None:
    store = Store.open(store_settings.with_(network_events_max=5))
    try:
        dropped = [store.append_network_events("sb_c", [connect(p)]) for p in range(1, 9)]
        assert dropped == [0, 0, 0, 0, 0, 1, 1, 1]
        assert [r.port for r in store.network_events("sb_c")] == [4, 5, 6, 7, 8]
        assert store.network_events_dropped("sb_c") == 3
        assert store.network_events_dropped("sb_unknown") == 0
        # A batch larger than the cap keeps its newest.
        assert store.append_network_events("sb_c", [connect(p) for p in range(100, 110)]) == 10
        assert [r.port for r in store.network_events("sb_c")] == list(range(105, 110))
        assert store.network_events_dropped("sb_c") == 13
    finally:
        store.close()


def test_a_cap_of_zero_is_refused_with_what_to_use() -> None:
    with pytest.raises(InvalidRequest, match="CORRAL_NETWORK_EVENTS_MAX=0 keeps no event"):
        Settings.from_env({"CORRAL_NETWORK_EVENTS_MAX": "0"})


def test_a_refused_sandbox_leaves_no_network_events(store: Store, team: Team) -> None:
    row = new_sandbox_row(team, state="creating")
    store.insert_sandbox(row)
    store.append_network_events(row.id, [connect(80)])
    store.delete_creating_sandbox(row.id)
    assert store.network_events(row.id) == []


def test_a_jobs_network_events_are_in_its_event_stream_in_order(store: Store, team: Team) -> None:
    job = submit(store, team)
    attempt = attempt_of(claim_one(store))
    store.append_network_events("sb_job", [connect(80), connect(443, "allowed")], attempt=attempt)
    assert store.add_events(attempt, [NewEvent("step_start", "step 0")])
    store.append_network_events("sb_job", [connect(8080)], attempt=attempt)

    events = store.job_events(job.id)
    assert [e.seq for e in events] == list(range(len(events)))
    assert [e.type for e in events] == [
        "state",
        "state",
        "network",
        "network",
        "step_start",
        "network",
    ]
    network = [e for e in events if e.type == "network"]
    assert [e.data["port"] for e in network] == [80, 443, 8080]
    assert network[0].data["decision"] == "denied" and network[0].attempt == 1
    assert network[0].reason == "denied connect tcp 10.99.0.10:80 (rule: private)"
    assert [e.seq for e in store.job_events(job.id, offset=events[3].seq)] == [3, 4, 5]
    assert [r.job_id for r in store.network_events("sb_job")] == [job.id] * 3


def test_events_after_the_attempt_ended_stay_with_the_sandbox_not_the_job(
    store: Store, team: Team
) -> None:
    job = submit(store, team)
    attempt = attempt_of(claim_one(store))
    store.end_attempt(attempt, "failed", "failed", exit_code=1)
    store.append_network_events("sb_lost", [connect(80)], attempt=attempt)
    assert "network" not in [e.type for e in store.job_events(job.id)]
    assert [r.job_seq for r in store.network_events("sb_lost")] == [None]


def test_a_deleted_job_takes_its_network_events(store: Store, team: Team) -> None:
    submit(store, team)
    attempt = attempt_of(claim_one(store))
    store.append_network_events("sb_gone", [connect(80)], attempt=attempt)
    store.end_attempt(attempt, "succeeded", "done", exit_code=0)
    assert store.delete_finished_jobs(datetime.now(UTC) + timedelta(seconds=1), 10) == 1
    assert store.network_events("sb_gone") == []


# -- the pump: live sandboxes and jobs ------------------------------------------------------


async def test_a_sandboxs_events_are_stored_as_it_runs_and_the_last_ones_at_its_kill(
    managers: StartManager, store: Store, team: Team, sandbox_host: None
) -> None:
    manager = await managers()
    record = await manager.create(team, CreateOptions())
    sandbox = await manager.running(team, record.id)
    followed: list[int] = []

    async def follow() -> None:
        async for rows, _dropped in manager.network_events(team, record.id, follow=True):
            followed.extend(r.port for r in rows)

    follower = asyncio.create_task(follow())
    for port in (1, 2, 3):
        sandbox.network_events.add(connect(port))
    await until(lambda: len(store.network_events(record.id)) == 3, "3 events stored")
    # Recorded just before the end: stored by the kill, not lost with the sandbox.
    sandbox.network_events.add(connect(4))
    sandbox.network_events.add(connect(5, "allowed"))
    await manager.kill(team, record.id)
    assert [r.port for r in store.network_events(record.id)] == [1, 2, 3, 4, 5]
    # The follower ends with the sandbox, having seen every event once.
    await asyncio.wait_for(follower, 10)
    assert followed == [1, 2, 3, 4, 5]


async def test_stopping_the_pump_stores_what_was_recorded_just_before(
    sandbox: IsolatedSandbox, store: Store
) -> None:
    """Events recorded with no chance for the pump to run (the sandbox's last moment)
    are stored by `stop`, not lost."""
    pump = NetworkEventPump(store, sandbox)
    sandbox.network_events.add(connect(1))
    sandbox.network_events.add(connect(2))
    await pump.stop()
    assert [r.port for r in store.network_events(sandbox.id)] == [1, 2]


async def test_another_teams_sandbox_events_are_not_found(
    managers: StartManager, store: Store, team: Team, sandbox_host: None
) -> None:
    manager = await managers()
    record = await manager.create(team, CreateOptions())
    other = store.create_team("other")
    with pytest.raises(NotFound, match="no sandbox"):
        manager.network_events(other, record.id)
    with pytest.raises(InvalidRequest, match="offset=-1 must be a whole number"):
        await anext(manager.network_events(team, record.id, offset=-1))


async def test_a_jobs_network_events_are_in_its_stream_before_its_end(
    own_runtime: Settings, store_settings: Settings, sandbox_host: None
) -> None:
    """A job's events, the last ones recorded just before it is canceled included, are in
    its event stream before the state event that ends it."""
    settings = own_runtime.with_(data_dir=store_settings.data_dir)
    store = Store.open(settings)
    try:
        team = store.create_team("jobs")
        signals = JobSignals()  # shared: the cancel reaches the worker at once
        queue = JobQueue(store, settings, signals=signals)
        spec = JobSpec.from_dict({"command": ["sleep", "60"]})
        row, _, _ = await queue.submit(team, spec)
        async with Engine(settings) as engine:
            worker = Worker(
                settings, store, engine=engine, concurrency=1, pool_size=0, signals=signals
            )
            await worker.start()
            try:
                sandbox = await until(
                    lambda: next(iter(engine.sandboxes.values()), None), "the job's sandbox"
                )
                sandbox.network_events.add(connect(80))
                await until(
                    lambda: any(e.type == "network" for e in store.job_events(row.id)),
                    "the first event in the job's stream",
                )
                sandbox.network_events.add(connect(443, "allowed"))
                queue.cancel(team, row.id, "enough")
                await until(lambda: job(store, row.id).final, "the job to end")
            finally:
                await worker.aclose()
        events = store.job_events(row.id)
        assert [e.seq for e in events] == list(range(len(events)))
        network = [e for e in events if e.type == "network"]
        assert [(e.data["decision"], e.data["port"]) for e in network] == [
            ("denied", 80),
            ("allowed", 443),
        ]
        assert events[-1].type == "state" and events[-1].state == "canceled"
        assert all(e.attempt == 1 for e in network)
        assert [r.job_id for r in store.network_events(sandbox.id)] == [row.id, row.id]
    finally:
        store.close()


# -- the API, the SDK and the CLI -----------------------------------------------------------


@pytest.fixture
def server_store(server: LiveServer) -> Iterator[Store]:
    """The live server's own store (SQLite, shared as with `corral admin`): where its
    pumps write, and where these tests put the events a sandbox's network would make."""
    store = Store.open(Settings(data_dir=server.data_dir))
    yield store
    store.close()


DNS = NetworkEvent(
    "dns", "allowed", "*.allowed.test", name="a.allowed.test", answers=("192.0.2.10",)
)
SUPPRESSED = NetworkEvent("suppressed", "denied", "private", name="connect", count=41)


def test_the_sdk_and_the_cli_show_a_sandboxs_events(
    server: LiveServer, server_store: Store, sandbox_host: None
) -> None:
    with Sandbox.create(timeout=60, **opts(server)) as box:
        server_store.append_network_events(box.sandbox_id, [DNS, connect(80), SUPPRESSED])
        events = list(box.events())
        assert [(e.seq, e.kind, e.decision) for e in events] == [
            (0, "dns", "allowed"),
            (1, "connect", "denied"),
            (2, "suppressed", "denied"),
        ]
        assert events[0].name == "a.allowed.test" and events[0].answers == ("192.0.2.10",)
        assert (events[1].protocol, events[1].address, events[1].port) == ("tcp", "10.99.0.10", 80)
        assert events[2].count == 41 and events[0].at is not None
        assert [e.seq for e in box.events(offset=2)] == [2]

        done = server.corral("sandbox", "events", box.sandbox_id)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert len(lines) == 3
        assert lines[0].endswith("allowed dns a.allowed.test -> 192.0.2.10 (rule: *.allowed.test)")
        assert lines[1].endswith("denied connect tcp 10.99.0.10:80 (rule: private)")
        assert "41 more connect events" in lines[2]

        done = server.corral("sandbox", "events", box.sandbox_id, "-o", "json", "--offset", "1")
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        assert [(r["seq"], r["kind"], r["port"]) for r in rows] == [
            (1, "connect", 80),
            (2, "suppressed", 0),
        ]


async def test_a_follow_gets_events_as_stored_and_ends_with_the_sandbox(
    server: LiveServer, server_store: Store, sandbox_host: None
) -> None:
    box = await AsyncSandbox.create(timeout=60, **opts(server))
    seen: list[int] = []

    async def follow() -> None:
        async for event in box.events(follow=True):
            seen.append(event.port)

    follower = asyncio.create_task(follow())
    try:
        server_store.append_network_events(box.sandbox_id, [connect(1)])
        await until(lambda: seen == [1], "the first event followed")
        server_store.append_network_events(box.sandbox_id, [connect(2)])
        await until(lambda: seen == [1, 2], "the second event followed")
    finally:
        await box.kill()
    await asyncio.wait_for(follower, 10)
    assert seen == [1, 2]
    # A killed sandbox's events can still be read.
    assert [e.port for e in [e async for e in box.events()]] == [1, 2]
    await box.aclose()


def test_events_of_an_unknown_sandbox_or_a_bad_offset_are_refused(server: LiveServer) -> None:
    done = server.corral("sandbox", "events", "sb_nosuchsandbox0000")
    assert done.returncode != 0
    assert "sandbox" in done.stderr and "sb_nosuchsandbox0000" in done.stderr, done.stderr
    done = server.corral("sandbox", "events", "sb_nosuchsandbox0000", "--offset", "-1")
    assert done.returncode != 0 and "--offset" in done.stderr, done.stderr


def test_over_the_wire_another_team_gets_not_found_and_a_bad_offset_is_invalid(
    server: LiveServer, server_store: Store, box: str
) -> None:
    server_store.append_network_events(box, [connect(80)])
    messages, end = stream(server, "StreamEvents", {"sandboxId": box})
    assert [m["events"][0]["port"] for m in messages] == [80] and "error" not in end
    other = server.new_team("events-tenant")
    messages, end = stream(server, "StreamEvents", {"sandboxId": box}, key=other)
    assert messages == [] and end["error"]["code"] == "not_found"
    messages, end = stream(server, "StreamEvents", {"sandboxId": box, "offset": "-1"})
    assert end["error"]["code"] == "invalid_argument"
    assert "offset=-1 must be a whole number >= 0" in end["error"]["message"]
