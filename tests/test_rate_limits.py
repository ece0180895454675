"""Rate limits per API key (`corral.server.ratelimit`): a burst past the limit is refused
with the seconds to wait, another key is unaffected, and streams past the cap are refused
until one ends. The bucket's arithmetic on a clock the test moves; the wire (Connect and
E2B's REST API) on one live server with small limits."""

from __future__ import annotations

import json
import math
import secrets
import struct
from base64 import b64decode
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral._wire import from_connect, to_connect
from corral.config import Settings
from corral.errors import InvalidRequest, RateLimited
from corral.server.ratelimit import RateLimits
from corral.store import Store, Team
from corral.v1.errors_pb2 import ErrorDetail
from tests.conftest import LiveServer, start_server
from tests.kit.polling import wait_until

# -- the limits' logic ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_past_the_bucket_is_refused_with_the_wait_and_refills() -> None:
    clock = Clock()
    limits = RateLimits(rate=2.0, burst=3, streams=0, clock=clock)
    for _ in range(3):
        limits.take("a")
    with pytest.raises(RateLimited, match=r"try again in 0\.50 s") as refused:
        limits.take("a")
    assert refused.value.retry_after == pytest.approx(0.5)
    limits.take("b")  # another key has its own bucket
    clock.now += 0.5  # one token back
    limits.take("a")
    with pytest.raises(RateLimited):
        limits.take("a")
    clock.now += 60  # refills up to the burst, no further
    for _ in range(3):
        limits.take("a")
    with pytest.raises(RateLimited):
        limits.take("a")


def test_streams_past_the_cap_are_refused_until_one_ends() -> None:
    limits = RateLimits(rate=0, burst=0, streams=2, clock=Clock())
    limits.open_stream("a")
    limits.open_stream("a")
    with pytest.raises(RateLimited, match="CORRAL_API_STREAMS"):
        limits.open_stream("a")
    limits.open_stream("b")
    limits.close_stream("a")
    limits.open_stream("a")
    assert limits.open_streams("a") == 2


def test_a_teams_own_limits_replace_the_servers() -> None:
    limits = RateLimits(rate=100, burst=100, streams=100, clock=Clock())
    slow = Team("team_slow", "slow", max_api_rate=1.0, max_api_streams=1)
    for _ in range(2):  # its burst: twice its rate
        limits.take("slow-key", slow)
    with pytest.raises(RateLimited, match="the team's max_api_rate"):
        limits.take("slow-key", slow)
    limits.open_stream("slow-key", slow)
    with pytest.raises(RateLimited, match="the team's max_api_streams"):
        limits.open_stream("slow-key", slow)
    # A team with 0 (the default) gets the server's.
    other = Team("team_other", "other")
    for _ in range(100):
        limits.take("other-key", other)
    with pytest.raises(RateLimited, match="CORRAL_API_RATE"):
        limits.take("other-key", other)


def test_zero_turns_the_limits_off() -> None:
    limits = RateLimits(rate=0, burst=0, streams=0, clock=Clock())
    for _ in range(10_000):
        limits.take("a")
        limits.open_stream("a")


@pytest.mark.parametrize(
    "env", [{"CORRAL_API_RATE": "-1"}, {"CORRAL_API_RATE": "5", "CORRAL_API_BURST": "0"}]
)
def test_bad_limits_are_refused_naming_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(InvalidRequest, match="CORRAL_API_RATE"):
        Settings.from_env(env)


def test_the_sdk_raises_rate_limited_with_the_servers_wait() -> None:
    sent = to_connect(RateLimited("slow down", retry_after=2.5))
    assert sent.code.value == "resource_exhausted"
    got = from_connect(sent, "http://127.0.0.1:1")
    assert isinstance(got, RateLimited) and got.retry_after == 2.5 and str(got) == "slow down"


# -- on the wire ---------------------------------------------------------------------------

# A slow refill (one token in 5 s): the burst test sees refusals however slow the host.
RATE, BURST, STREAMS = 0.2, 20, 1
JOBS = "/corral.v1.JobService/"


@pytest.fixture(scope="module")
def limited(settings: Settings) -> Iterator[LiveServer]:
    """A server whose keys may send 20 requests at once, one in 5 s after, and hold one
    stream open; no job workers, so a job stays queued and a follow stays open."""
    data = settings.runtime_dir / f"rate-limits-{secrets.token_hex(4)}"
    env = {
        "CORRAL_API_RATE": str(RATE),
        "CORRAL_API_BURST": str(BURST),
        "CORRAL_API_STREAMS": str(STREAMS),
        "CORRAL_JOB_WORKERS": "0",
    }
    live = start_server(settings, data, pool_size=0, extra_env=env)
    try:
        yield live
    finally:
        live.stop()


def team_key(server: LiveServer, name: str) -> str:
    """A new team in the server's store and its key (in this process: quicker than
    `corral admin`, which the override test uses)."""
    store = Store.open(Settings(data_dir=server.data_dir, base_template="off"))
    try:
        store.create_team(name)
        return store.create_api_key(name)
    finally:
        store.close()


def post(
    server: LiveServer, method: str, body: Any, key: str, client: httpx.Client | None = None
) -> httpx.Response:
    url, headers = server.url + JOBS + method, {"Authorization": f"Bearer {key}"}
    if client is None:
        return httpx.post(url, json=body, headers=headers, timeout=30)
    return client.post(url, json=body, headers=headers)


def envelope(body: Any) -> bytes:
    payload = json.dumps(body).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


STREAM_HEADERS = {"Content-Type": "application/connect+json"}


def end_of_stream(data: bytes) -> dict[str, Any]:
    """The end message of a Connect stream's body (flag 2)."""
    while data:
        flags, size = struct.unpack(">BI", data[:5])
        message, data = data[5 : 5 + size], data[5 + size :]
        if flags & 2:
            end: dict[str, Any] = json.loads(message)
            return end
    raise AssertionError("the stream has no end message")


def retry_seconds(error: dict[str, Any]) -> float:
    """The seconds to wait an error's ErrorDetail says."""
    for detail in error.get("details", ()):
        if detail["type"] == "corral.v1.ErrorDetail":
            found = ErrorDetail.FromString(b64decode(detail["value"] + "=="))
            assert found.type == "RateLimited"
            return found.retry_after_seconds
    raise AssertionError(f"no ErrorDetail in {error}")


def test_a_burst_is_refused_with_a_retry_hint_and_another_key_is_not(
    limited: LiveServer,
) -> None:
    key, other = team_key(limited, "bursty"), team_key(limited, "calm")
    with httpx.Client(timeout=30) as client:
        answers = [post(limited, "List", {}, key, client) for _ in range(BURST + 10)]
    statuses = [a.status_code for a in answers]
    # The bucket starts full; it refills slowly while the burst is sent.
    assert statuses.count(200) >= BURST and statuses.count(429) >= 5, statuses
    refused = next(a for a in answers if a.status_code == 429)
    body = refused.json()
    assert body["code"] == "resource_exhausted" and "CORRAL_API_RATE" in body["message"]
    wait = retry_seconds(body)
    assert 0 < wait <= 1 / RATE
    assert refused.headers["retry-after"] == str(math.ceil(wait))
    # Another key's bucket is its own.
    assert post(limited, "List", {}, other).status_code == 200
    # E2B's REST API counts the same key: 429 with Retry-After.
    e2b = httpx.get(limited.url + "/sandboxes", headers={"X-API-KEY": key}, timeout=30)
    assert e2b.status_code == 429 and 1 <= int(e2b.headers["retry-after"]) <= 5, e2b.text
    assert "try again in" in e2b.json()["message"]


def test_streams_past_the_cap_are_refused_and_freed_when_one_ends(
    limited: LiveServer,
) -> None:
    key = team_key(limited, "streamer")
    submitted = post(limited, "Submit", {"spec": {"command": ["true"]}}, key)
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()["job"]["id"]
    follow = {"jobId": job, "follow": True}
    url = limited.url + JOBS + "StreamEvents"
    headers = {**STREAM_HEADERS, "Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", url, content=envelope(follow), headers=headers) as first,
    ):
        assert first.status_code == 200
        # Its first event came: the stream is open. The iterator is kept: dropped, httpx
        # would close the response, and the server (connectrpc 0.13 notices a disconnect at
        # once) would free the slot before the second stream asks for one.
        events = first.iter_bytes()
        next(events)
        second = httpx.post(url, content=envelope(follow), headers=headers, timeout=30)
        end = end_of_stream(second.content)
        assert end["error"]["code"] == "resource_exhausted", end
        assert "CORRAL_API_STREAMS" in end["error"]["message"]
        assert retry_seconds(end["error"]) > 0
    # The first stream is closed by its client: its slot is freed (polled, with a ceiling).
    done = {"jobId": job, "follow": False}

    def opened() -> bool:
        answer = httpx.post(url, content=envelope(done), headers=headers, timeout=30)
        return "error" not in end_of_stream(answer.content)

    wait_until(opened, "a stream to open after the other ended", timeout=10, interval=0.6)


def test_a_team_set_to_its_own_rate_is_held_to_it(limited: LiveServer) -> None:
    key = team_key(limited, "tight")
    done = limited.corral(
        "admin", "team", "set", "tight", "--max-api-rate", "0.5", "--max-api-streams", "3"
    )
    assert done.returncode == 0 and "max_api_rate=0.5, max_api_streams=3" in done.stdout

    # Within the key cache's half second the server holds the team to 0.5 a second,
    # bursts of 1, instead of the server's burst of 20.
    def held() -> bool:
        with httpx.Client(timeout=30) as client:
            answers = [post(limited, "List", {}, key, client).status_code for _ in range(3)]
        return 429 in answers

    wait_until(held, "the team's own rate to apply", timeout=5, interval=0.5)
    refused = post(limited, "List", {}, key)
    assert refused.status_code == 429 and "max_api_rate" in refused.json()["message"]
