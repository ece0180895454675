"""The API as any HTTP client sees it: Connect JSON with httpx (what curl sends), against a
real server process. Every bad request gets a clear status and the server keeps serving."""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, every_tier
from tests.kit.connect import SERVICE, assert_serving, call, error, stream
from tests.kit.polling import wait_until

# Keys, teams, timeouts and states are the store's: on SQLite and on PostgreSQL.
pytestmark = pytest.mark.every_database

# -- health and auth -----------------------------------------------------------------------


def test_health_needs_no_key(server: LiveServer) -> None:
    health = httpx.get(server.url + "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "serving"
    check = httpx.post(
        server.url + "/corral.v1.HealthService/Check",
        content=b"{}",
        headers={"Content-Type": "application/json"},
    )
    assert check.status_code == 200 and check.json()["status"] == "serving"


def test_no_key_or_a_bad_key_is_unauthenticated(server: LiveServer) -> None:
    message = error(call(server, "List", key=None), 401, "unauthenticated")
    assert "Authorization: Bearer" in message
    error(call(server, "List", key="crl_" + "x" * 32), 401, "unauthenticated")
    error(call(server, "List", key="not-even-a-key"), 401, "unauthenticated")
    assert_serving(server)


def test_a_revoked_key_stops_working_within_a_second(server: LiveServer) -> None:
    key = server.new_team("revokers")
    assert call(server, "List", key=key).status_code == 200  # now in the server's key cache
    assert server.corral("admin", "key", "revoke", key).returncode == 0
    # Polled, not slept: the server's cache forgets a key after KEY_CACHE_SECONDS.

    def refused() -> httpx.Response | None:
        answer = call(server, "List", key=key)
        return answer if answer.status_code == 401 else None

    answer = wait_until(refused, "the revoked key to be refused", timeout=1.0, interval=0.05)
    error(answer, 401, "unauthenticated")


def test_teams_never_see_each_others_sandboxes(server: LiveServer, box: str) -> None:
    other = server.new_team("tenant-b")
    for method, body in [
        ("Get", {"sandboxId": box}),
        ("Kill", {"sandboxId": box}),
        ("Pause", {"sandboxId": box}),
        ("SetTimeout", {"sandboxId": box, "timeoutSeconds": 1}),
        ("ListDir", {"sandboxId": box, "path": "/"}),
        ("Stat", {"sandboxId": box, "path": "/etc/hostname"}),
        ("Signal", {"sandboxId": box, "pid": 1, "signal": 9}),
        ("GetMetrics", {"sandboxId": box}),
    ]:
        error(call(server, method, body, key=other), 404, "not_found")
    messages, end = stream(server, "Exec", {"sandboxId": box, "cmd": "true"}, key=other)
    assert messages == [] and end["error"]["code"] == "not_found"
    messages, end = stream(server, "ReadFile", {"sandboxId": box, "path": "x"}, key=other)
    assert end["error"]["code"] == "not_found"
    listed = call(server, "List", key=other).json()
    assert box not in [s["id"] for s in listed.get("sandboxes", [])]
    # the owner still has it, untouched
    assert call(server, "Get", {"sandboxId": box}).json()["sandbox"]["state"] == (
        "SANDBOX_STATE_RUNNING"
    )


# -- the happy path in JSON ----------------------------------------------------------------


@every_tier
@pytest.mark.microvm_subset
def test_exec_streams_start_output_and_end(server: LiveServer, box: str) -> None:
    messages, end = stream(
        server,
        "Exec",
        {"sandboxId": box, "cmd": "echo out; echo err >&2; exit 3", "envs": {"A": "1"}},
    )
    assert end == {} or "error" not in end
    assert "start" in messages[0] and messages[0]["start"]["pid"] > 0
    out = b"".join(base64.b64decode(m["stdout"]) for m in messages if "stdout" in m)
    err = b"".join(base64.b64decode(m["stderr"]) for m in messages if "stderr" in m)
    assert (out, err) == (b"out\n", b"err\n")
    assert messages[-1]["end"]["exitCode"] == 3 and messages[-1]["end"]["reason"] == "exited"


def test_binary_codec_works_too(server: LiveServer, box: str) -> None:
    from corral.v1 import sandbox_pb2 as pb

    response = httpx.post(
        server.url + SERVICE + "Get",
        content=pb.GetRequest(sandbox_id=box).SerializeToString(),
        headers={"Content-Type": "application/proto", "Authorization": f"Bearer {server.key}"},
    )
    assert response.status_code == 200
    assert pb.GetResponse.FromString(response.content).sandbox.id == box


@every_tier
def test_files_round_trip_and_dotdot_stays_inside(server: LiveServer, box: str) -> None:
    messages, _ = stream(
        server, "Exec", {"sandboxId": box, "cmd": "mkdir -p d && echo secret > d/f"}
    )
    assert messages[-1]["end"].get("exitCode", 0) == 0
    listing = call(server, "ListDir", {"sandboxId": box, "path": "d"}).json()
    assert [e["name"] for e in listing["entries"]] == ["f"]
    # `..` is resolved inside the sandbox: this is the sandbox's own /etc/hostname
    messages, _ = stream(server, "ReadFile", {"sandboxId": box, "path": "../../../etc/hostname"})
    hostname = b"".join(base64.b64decode(m.get("data", "")) for m in messages)
    assert hostname.strip().decode().startswith("sb-")


# -- bad input -----------------------------------------------------------------------------


def test_unknown_sandbox_and_unknown_method(server: LiveServer) -> None:
    error(call(server, "Get", {"sandboxId": "sb_0123456789abcdef0123"}), 404, "not_found")
    error(call(server, "Get", {}), 400, "invalid_argument")
    assert httpx.post(server.url + SERVICE + "Nope", content=b"{}").status_code == 404
    assert httpx.get(server.url + "/nothing-here").status_code == 404
    assert_serving(server)


def test_malformed_json_and_wrong_types(server: LiveServer) -> None:
    message = error(call(server, "Create", raw=b"{not json"), 400, "invalid_argument")
    assert "JSON" in message  # connectrpc: "unmarshal message: Failed to load JSON: ..."
    message = error(call(server, "Create", {"timeoutSeconds": "soon"}), 400, "invalid_argument")
    assert "timeoutSeconds" in message
    error(call(server, "List", {"pageSize": [1, 2]}), 400, "invalid_argument")
    error(call(server, "List", {"noSuchField": 1}), 400, "invalid_argument")
    error(call(server, "Create", raw=b"\xff\xfe"), 400, "invalid_argument")
    assert_serving(server)


def test_negative_timeouts(server: LiveServer, box: str) -> None:
    error(call(server, "Create", {"timeoutSeconds": -1}), 400, "invalid_argument")
    error(call(server, "Create", {"idleTimeoutSeconds": -5}), 400, "invalid_argument")
    message = error(
        call(server, "SetTimeout", {"sandboxId": box, "timeoutSeconds": -1}),
        400,
        "invalid_argument",
    )
    assert "negative" in message
    _, end = stream(server, "Exec", {"sandboxId": box, "cmd": "true", "timeoutSeconds": -2})
    assert end["error"]["code"] == "invalid_argument"
    assert_serving(server)


def test_paths_with_nul_are_refused(server: LiveServer, box: str) -> None:
    message = error(
        call(server, "Stat", {"sandboxId": box, "path": "a\u0000b"}), 400, "invalid_argument"
    )
    assert "NUL" in message
    _, end = stream(server, "ReadFile", {"sandboxId": box, "path": "/etc/\u0000passwd"})
    assert end["error"]["code"] == "invalid_argument"
    error(call(server, "MakeDir", {"sandboxId": box, "path": ""}), 400, "invalid_argument")
    assert_serving(server)


def test_oversized_requests(server: LiveServer, box: str) -> None:
    big = {"sandboxId": box, "pid": 1, "data": base64.b64encode(b"x" * (9 << 20)).decode()}
    message = error(call(server, "SendInput", big), 429, "resource_exhausted")
    assert "limit" in message
    # a streamed message declaring 100 MiB is refused from its length prefix
    response = httpx.post(
        server.url + SERVICE + "WriteFile",
        content=struct.pack(">BI", 0, 100 << 20) + b"{}",
        headers={
            "Content-Type": "application/connect+json",
            "Authorization": f"Bearer {server.key}",
        },
    )
    assert response.status_code == 200  # streams report errors in their end message
    assert b"resource_exhausted" in response.content and b"limit" in response.content
    assert_serving(server)


def test_native_grpc_is_refused_with_the_reason(server: LiveServer) -> None:
    response = httpx.post(
        server.url + "/corral.v1.HealthService/Check",
        content=b"\x00\x00\x00\x00\x00",
        headers={"Content-Type": "application/grpc"},
    )
    assert response.status_code == 415 and "HTTP/2 trailers" in response.json()["message"]


def test_grpc_web_works(server: LiveServer) -> None:
    response = httpx.post(
        server.url + "/corral.v1.HealthService/Check",
        content=b"\x00\x00\x00\x00\x00",
        headers={"Content-Type": "application/grpc-web+proto"},
    )
    assert response.status_code == 200
    assert b"serving" in response.content and b"grpc-status: 0" in response.content


# -- lifetimes -----------------------------------------------------------------------------


def in_state(server: LiveServer, sandbox_id: str, state: str) -> dict[str, Any]:
    """The sandbox once Get shows it in `state`."""

    def got() -> dict[str, Any] | None:
        sandbox: dict[str, Any] = call(server, "Get", {"sandboxId": sandbox_id}).json()["sandbox"]
        return sandbox if sandbox["state"] == state else None

    return wait_until(got, f"{sandbox_id} in {state}", timeout=10)


def test_timeout_kills_and_idle_pauses(server: LiveServer, sandbox_host: None) -> None:
    short = call(server, "Create", {"timeoutSeconds": 1}).json()["sandbox"]["id"]
    idle = call(
        server,
        "Create",
        {"timeoutSeconds": 60, "idleTimeoutSeconds": 1, "onIdle": "IDLE_ACTION_PAUSE"},
    ).json()["sandbox"]["id"]
    killed = in_state(server, short, "SANDBOX_STATE_KILLED")
    assert "timeout" in killed["stateReason"]
    paused = in_state(server, idle, "SANDBOX_STATE_PAUSED")
    assert "idle" in paused["stateReason"]
    _, end = stream(server, "Exec", {"sandboxId": idle, "cmd": "true"})
    assert end["error"]["code"] == "failed_precondition"
    assert "resume" in end["error"]["message"]
    assert call(server, "Resume", {"sandboxId": idle}).status_code == 200
    assert call(server, "Kill", {"sandboxId": idle}).status_code == 200


def test_a_native_grpc_client_gets_no_answer(server: LiveServer) -> None:
    """The README's answer on gRPC: uvicorn speaks HTTP/1.1 only, so no h2c, no trailers."""
    grpc = pytest.importorskip("grpc")
    from corral.v1 import health_pb2

    with grpc.insecure_channel(server.url.removeprefix("http://")) as channel:
        check = channel.unary_unary(
            "/corral.v1.HealthService/Check",
            request_serializer=health_pb2.CheckRequest.SerializeToString,
            response_deserializer=health_pb2.CheckResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as failure:
            check(health_pb2.CheckRequest(), timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_serving(server)
