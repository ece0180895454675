"""envd's error hygiene on a real server: a failure that is no CorralError answers JSON
500 (traceback in the log), an unknown user answers 401 naming the users there are (as
E2B's envd's InvalidUser), and a stream broken by a killed sandbox logs no ERROR."""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any

import httpx
import pytest

from corral.server.base import Services
from corral.server.e2b.envd import EnvdApp
from corral.store import Store
from tests import test_e2b_process as e2b
from tests.conftest import LiveServer
from tests.kit.connect import call


def _log_from(server: LiveServer, offset: int) -> str:
    return server.log.read_bytes()[offset:].decode(errors="replace")


@pytest.mark.integration
async def test_a_failure_in_an_envd_route_answers_json_500_and_logs_its_traceback(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """In process (the real app and store): uvicorn's parser refuses a query that is not
    ASCII, which another ASGI server may pass on; /files then fails decoding it, which
    is no CorralError (and no request through uvicorn found one to stand in for it)."""
    app = EnvdApp(Services(store=store), "corral.test")
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/files",
        "query_string": b"path=\xff&signature=v1_x",
        "headers": [],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.ERROR, logger="corral.server.e2b"):
        await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert answer["code"] == 500 and "log has details" in answer["message"]
    (record,) = [r for r in caplog.records if r.message == "envd request failed"]
    assert record.exc_info is not None and record.exc_info[0] is UnicodeDecodeError


def _basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


@pytest.mark.integration
@pytest.mark.sandbox
def test_an_unknown_user_is_401_naming_the_users_there_are(server: LiveServer, box: str) -> None:
    headers = e2b._headers(server, box, Authorization=_basic("ghost"))
    stat = httpx.post(
        f"{server.url}/filesystem.Filesystem/Stat", json={"path": "."}, headers=headers, timeout=30
    )
    assert stat.status_code == 401, stat.text
    assert stat.json()["code"] == "unauthenticated"
    assert (
        "user 'ghost' does not exist in this sandbox; its users are root" in stat.json()["message"]
    )

    files = httpx.get(
        f"{server.url}/files",
        params={"path": "x", "username": "ghost"},
        headers=e2b._headers(server, box),
        timeout=30,
    )
    assert files.status_code == 401, files.text
    assert files.json()["code"] == 401 and "its users are root" in files.json()["message"]

    with e2b.stream(server, box, "Start", e2b.bash("true"), Authorization=_basic("ghost")) as s:
        assert s.next() is None and s.end is not None
    assert s.end["error"]["code"] == "unauthenticated", s.end


@pytest.mark.integration
@pytest.mark.sandbox
def test_a_stream_broken_by_a_killed_sandbox_logs_no_error(server: LiveServer) -> None:
    created = call(server, "Create", {"timeoutSeconds": 120})
    assert created.status_code == 200, created.text
    box = created.json()["sandbox"]["id"]
    offset = server.log.stat().st_size
    failure: list[BaseException] = []
    with e2b.stream(server, box, "Start", e2b.bash("sleep 60")) as s:
        e2b.started(s)

        def read_to_the_end() -> None:
            try:
                s.rest()
            except BaseException as exc:
                failure.append(exc)

        reader = threading.Thread(target=read_to_the_end)
        reader.start()
        assert call(server, "Kill", {"sandboxId": box}).status_code == 200
        reader.join(30)
        assert not reader.is_alive()
    # Still a reset, which E2B's SDK counts as a transport failure.
    assert failure and isinstance(failure[0], httpx.ReadError), failure
    log = _log_from(server, offset)
    assert "without completing response" not in log, log
