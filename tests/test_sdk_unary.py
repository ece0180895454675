"""The SDK's loop-free path (`corral.client._listing`, `_unary`): the CLI's `sandbox list`.

It gives what the async SDK gives, raises the errors it raises with the same messages,
and loads neither asyncio nor the RPC runtime nor the engine, so a CLI built on it starts
fast (issue 10).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from corral import AsyncSandbox, Sandbox, errors
from corral._wire import code_for, from_connect, to_connect
from corral.client import SandboxInfo, _listing
from corral.client._listing import list_sandboxes
from corral.errors import (
    CorralError,
    InvalidRequest,
    NotFound,
    ServerUnavailable,
    Unauthenticated,
)
from tests.conftest import LiveServer, free_port, opts

# Lists (filters, states, pages) are the store's: on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.usefixtures("sandbox_host"), pytest.mark.every_database]


def comparable(infos: list[SandboxInfo]) -> list[SandboxInfo]:
    # Activity between the two calls (the warm pool, the reaper) may move this one stamp.
    return sorted(
        (dataclasses.replace(i, last_activity_at=None) for i in infos),
        key=lambda i: i.sandbox_id,
    )


async def test_the_list_is_the_async_sdks_list_page_by_page(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One sandbox a page: both paths must follow next_page_token to the end.
    monkeypatch.setattr(_listing, "_PAGE_SIZE", 1)
    tag = secrets.token_hex(4)
    boxes = [
        await AsyncSandbox.create(metadata={"suite": tag, "n": str(n)}, timeout=60, **opts(server))
        for n in range(3)
    ]
    try:
        await boxes[2].kill()
        for query in (
            {"metadata": {"suite": tag}},
            {"metadata": {"suite": tag, "n": "1"}},
            {"metadata": {"suite": tag}, "states": ["killed"]},
            {"metadata": {"suite": tag}, "states": ["running", "killed"]},
        ):
            listed = list_sandboxes(**query, **opts(server))
            expected = await AsyncSandbox.list(**query, **opts(server))
            assert comparable(listed) == comparable(expected), query
        ids = [b.sandbox_id for b in boxes]
        assert {i.sandbox_id for i in list_sandboxes(metadata={"suite": tag}, **opts(server))} == {
            ids[0],
            ids[1],
        }
        killed = list_sandboxes(metadata={"suite": tag}, states=["killed"], **opts(server))
        assert [(i.sandbox_id, i.state) for i in killed] == [(ids[2], "killed")]
    finally:
        for box in boxes:
            if await box.is_running():
                await box.kill()
            await box.aclose()


def test_sandbox_list_is_the_loop_free_list() -> None:
    assert Sandbox.list is list_sandboxes


async def test_a_bad_key_gives_the_async_paths_error(server: LiveServer) -> None:
    bad: dict[str, Any] = {"server": server.url, "api_key": "crl_" + "y" * 32}
    with pytest.raises(Unauthenticated) as sync_error:
        list_sandboxes(**bad)
    with pytest.raises(Unauthenticated) as async_error:
        await AsyncSandbox.list(**bad)
    assert "API key" in str(sync_error.value)
    assert str(sync_error.value) == str(async_error.value)


def test_an_unknown_state_is_refused_before_any_call() -> None:
    # Nothing listens there: a call would raise ServerUnavailable instead.
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InvalidRequest, match="unknown state 'asleep': use creating, running"):
        list_sandboxes(states=["running", "asleep"], server=dead, api_key="crl_x")


async def test_a_dead_server_gives_the_async_paths_message() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable) as sync_error:
        list_sandboxes(server=dead, api_key="crl_x")
    with pytest.raises(ServerUnavailable) as async_error:
        await AsyncSandbox.list(server=dead, api_key="crl_x")
    hint = (
        "); start one with `corral server` (`make run` in a clone), or name yours with"
        " --server, CORRAL_SERVER or `corral context use`"
    )
    for error in (sync_error.value, async_error.value):
        message = str(error)
        assert message.startswith(f"the Corral server at {dead} did not answer ("), message
        assert message.endswith(hint), message
        assert "onnection refused" in message, message


def test_a_server_that_never_answers_times_out_with_the_same_message() -> None:
    # The kernel accepts the connection into the backlog; nobody ever reads or replies.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ServerUnavailable) as error:
            list_sandboxes(server=url, api_key="crl_x", request_timeout=0.5)
    assert str(error.value).startswith(f"the Corral server at {url} did not answer (timed out)")


class _Fixed(http.server.BaseHTTPRequestHandler):
    """Answers every POST with `reply` (status, content-type, body): a stand-in for a
    proxy or some other service at the server's URL."""

    reply: tuple[int, str, bytes] = (200, "text/plain", b"")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        status, content_type, body = self.reply
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_service() -> Iterator[tuple[str, type[_Fixed]]]:
    handler = type("Handler", (_Fixed,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("reply", "error", "message"),
    [
        # A proxy whose upstream is down: the server did not answer.
        ((502, "text/html", b"<h1>Bad Gateway</h1>"), ServerUnavailable, "did not answer"),
        # A Connect error with an ErrorDetail: the class it names, its message as sent.
        (
            (
                404,
                "application/json",
                json.dumps(
                    {
                        "code": "not_found",
                        "message": "no sandbox sb_1; list yours with `corral sandbox list`",
                        "details": [{"type": "corral.v1.ErrorDetail", "value": "CghOb3RGb3VuZA"}],
                    }
                ).encode(),
            ),
            NotFound,
            r"^no sandbox sb_1; list yours with `corral sandbox list`$",
        ),
        # A Connect error without detail: the first class for its code.
        (
            (400, "application/json", b'{"code": "invalid_argument", "message": "bad"}'),
            InvalidRequest,
            "^bad$",
        ),
        # Something else's 200: not taken for an empty list.
        ((200, "text/html", b"<html></html>"), CorralError, "not a Corral API reply"),
    ],
)
def test_other_answers_become_corral_errors(
    other_service: tuple[str, type[_Fixed]],
    reply: tuple[int, str, bytes],
    error: type[CorralError],
    message: str,
) -> None:
    url, handler = other_service
    handler.reply = reply
    with pytest.raises(error, match=message):
        list_sandboxes(server=url, api_key="crl_x")


_FORBIDDEN = (
    "asyncio",
    "connectrpc",
    "pyqwest",
    "yaml",
    "sqlalchemy",
    "corral.isolation",
    "corral.jobs",
    "corral.store",
    "corral.client._sync",
    "importlib.metadata",
)


def test_listing_loads_no_loop_no_rpc_runtime_and_no_engine(server: LiveServer) -> None:
    script = f"""
import sys
from corral.client._listing import list_sandboxes
assert isinstance(list_sandboxes(server={server.url!r}, api_key={server.key!r}), list)
forbidden = {_FORBIDDEN!r}
print(sorted(m for m in sys.modules if m.split(".")[0] in forbidden or m.startswith(forbidden)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


@pytest.mark.parametrize(
    "error",
    [
        errors.NotFound("no sandbox sb_1"),
        errors.FileNotFound("no /x"),
        errors.Forbidden("not yours"),
        errors.IdempotencyConflict("key reused"),
        errors.ServerUnavailable("the Corral server is shutting down"),
        errors.IsolationUnavailable("no bwrap"),
    ],
)
def test_the_one_table_maps_both_ways(error: CorralError) -> None:
    sent = to_connect(error)
    assert sent.code.value == code_for(error)
    back = from_connect(sent, "http://127.0.0.1:1")
    assert (type(back), str(back)) == (type(error), str(error))


def test_an_internal_error_is_logged_and_sent_without_its_trace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failure = RuntimeError("secret detail")
    sent = to_connect(failure)
    assert (sent.code.value, "secret" in sent.message) == ("internal", False)
    assert "the server log has the details" in sent.message
    logged = [r for r in caplog.records if r.name == "corral.server"]
    assert [(r.getMessage(), r.exc_info and r.exc_info[1]) for r in logged] == [
        ("internal error", failure)
    ]
