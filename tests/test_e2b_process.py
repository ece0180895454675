"""envd's process.Process on a real server, spoken as E2B's SDK speaks it: Connect JSON,
unary and streamed envelopes, routed by `E2b-Sandbox-Id` (tests/e2b_sdk runs the SDK).

The sandboxes here are created with Corral's own API, so each envd call also sends the
team's key as `X-API-KEY` (what `corral.server.e2b.call` asks of such sandboxes).
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.kit.connect import call

pytestmark = [pytest.mark.integration, pytest.mark.sandbox]

Message = dict[str, Any]


def _headers(server: LiveServer, sandbox_id: str, **extra: str) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-API-KEY": server.key,
        "Connect-Protocol-Version": "1",
        **extra,
    }


def unary(server: LiveServer, sandbox_id: str, method: str, body: Message) -> httpx.Response:
    return httpx.post(
        f"{server.url}/process.Process/{method}",
        json=body,
        headers=_headers(server, sandbox_id),
        timeout=30,
    )


def ok(response: httpx.Response) -> Message:
    assert response.status_code == 200, response.text
    body: Message = response.json()
    return body


class Stream:
    """A server stream being read: its messages one at a time, and its end envelope."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.end: Message | None = None
        self._chunks = response.iter_bytes()
        self._buffer = b""

    def _read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._buffer += next(self._chunks)  # StopIteration: the body ended early
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def next(self) -> Message | None:
        """The next message; None once the end envelope came (then in `end`)."""
        if self.end is not None:
            return None
        flags, length = struct.unpack(">BI", self._read(5))
        message: Message = json.loads(self._read(length))
        if flags & 0x02:
            self.end = message
            return None
        return message

    def event(self, skip_keepalive: bool = True) -> Message | None:
        while (message := self.next()) is not None:
            event: Message = message["event"]
            if not (skip_keepalive and "keepalive" in event):
                return event
        return None

    def rest(self) -> list[Message]:
        """Every event until the end envelope."""
        events = []
        while (event := self.event()) is not None:
            events.append(event)
        return events


@contextmanager
def stream(
    server: LiveServer, sandbox_id: str, method: str, body: Message, **headers: str
) -> Iterator[Stream]:
    payload = json.dumps(body).encode()
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{server.url}/process.Process/{method}",
            content=struct.pack(">BI", 0, len(payload)) + payload,
            headers=_headers(
                server, sandbox_id, **{"Content-Type": "application/connect+json", **headers}
            ),
        ) as response,
    ):
        assert response.status_code == 200, response.read()
        yield Stream(response)


def bash(command: str, **more: Any) -> Message:
    """A StartRequest as E2B's SDK sends one for `commands.run(command)`."""
    return {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", command], **more}, "stdin": False}


def output(events: list[Message], name: str = "stdout") -> bytes:
    return b"".join(base64.b64decode(e["data"][name]) for e in events if name in e.get("data", {}))


def started(s: Stream) -> int:
    first = s.event()
    assert first is not None and "start" in first, (first, s.end)
    pid: int = first["start"]["pid"]
    assert pid > 0
    return pid


def running_pids(server: LiveServer, box: str) -> set[int]:
    return {p["pid"] for p in ok(unary(server, box, "List", {})).get("processes", [])}


def test_start_streams_start_output_and_a_go_style_end(server: LiveServer, box: str) -> None:
    with stream(server, box, "Start", bash("echo out; echo err >&2; exit 3")) as s:
        started(s)
        events = s.rest()
        assert s.end == {}  # a clean end: the result is in the end event
    assert output(events) == b"out\n"
    assert output(events, "stderr") == b"err\n"
    assert events[-1] == {"end": {"exitCode": 3, "exited": True, "status": "exit status 3"}}


def test_bytes_pass_raw_and_envs_are_per_command(server: LiveServer, box: str) -> None:
    with stream(
        server, box, "Start", bash("printf 'a\\xe2'; echo \"$FOO\"", envs={"FOO": "x"})
    ) as s:
        started(s)
        assert output(s.rest()) == b"a\xe2x\n"
    with stream(server, box, "Start", bash('echo "[$FOO]"; pwd', cwd="/tmp")) as s:
        started(s)
        assert output(s.rest()) == b"[]\n/tmp\n"


def test_commands_start_in_their_users_home_and_resolve_cwd_from_it(
    server: LiveServer, box: str
) -> None:
    # Not the workdir (/workspace): envd starts commands in the user's home.
    with stream(server, box, "Start", bash('mkdir -p sub; pwd; echo "$HOME"')) as s:
        started(s)
        here, home = output(s.rest()).decode().split()
    assert here == home != "/workspace"
    with stream(server, box, "Start", bash("pwd", cwd="sub")) as s:
        started(s)
        assert output(s.rest()).decode() == f"{home}/sub\n"


def test_stdin_is_written_and_closed(server: LiveServer, box: str) -> None:
    with stream(server, box, "Start", {**bash("cat"), "stdin": True}) as s:
        pid = started(s)
        selector = {"process": {"pid": pid}}
        data = base64.b64encode(b"Hello,\nWorld!").decode()
        ok(unary(server, box, "SendInput", {**selector, "input": {"stdin": data}}))
        event = s.event()
        assert event is not None and base64.b64decode(event["data"]["stdout"]) == b"Hello,\nWorld!"
        ok(unary(server, box, "CloseStdin", selector))
        assert s.rest()[-1] == {"end": {"exited": True, "status": "exit status 0"}}


def test_stream_input_writes_in_order(server: LiveServer, box: str) -> None:
    with stream(server, box, "Start", {**bash("cat"), "stdin": True}) as s:
        pid = started(s)
        messages = [
            {"start": {"process": {"pid": pid}}},
            *(
                {"data": {"input": {"stdin": base64.b64encode(part).decode()}}}
                for part in (b"a", b"b")
            ),
            {"keepalive": {}},
        ]
        body = b"".join(
            struct.pack(">BI", 0, len(m)) + m for m in (json.dumps(x).encode() for x in messages)
        )
        response = httpx.post(
            f"{server.url}/process.Process/StreamInput",
            content=body,
            headers=_headers(server, box, **{"Content-Type": "application/connect+json"}),
            timeout=30,
        )
        assert response.status_code == 200 and response.content.endswith(b"{}"), response.content
        ok(unary(server, box, "CloseStdin", {"process": {"pid": pid}}))
        assert output(s.rest()) == b"ab"


def test_input_to_a_process_without_stdin_is_refused(server: LiveServer, box: str) -> None:
    with stream(server, box, "Start", bash("sleep 30")) as s:  # stdin false, as the SDK sends
        selector = {"process": {"pid": started(s)}}
        sent = unary(server, box, "SendInput", {**selector, "input": {"stdin": "aGk="}})
        assert sent.status_code == 400 and sent.json()["code"] == "failed_precondition"
        assert "started without stdin" in sent.json()["message"]
        closed = unary(server, box, "CloseStdin", selector)
        assert closed.status_code == 400 and "started without stdin" in closed.json()["message"]
        ok(unary(server, box, "SendSignal", {**selector, "signal": "SIGNAL_SIGTERM"}))
        assert s.rest()[-1]["end"] == {"exitCode": -1, "status": "signal: terminated"}


def test_a_dropped_start_stream_leaves_the_process_to_connect_list_and_kill(
    server: LiveServer, box: str
) -> None:
    start = {**bash("while :; do sleep 0.2; done"), "tag": "looper"}
    with stream(server, box, "Start", start) as s:
        pid = started(s)
    # The stream is gone; the process is not (E2B's background commands, PTY reconnects).
    listed = ok(unary(server, box, "List", {}))["processes"]
    mine = next(p for p in listed if p["pid"] == pid)
    assert mine["config"] == {"cmd": "/bin/bash", "args": ["-l", "-c", start["process"]["args"][2]]}
    assert mine["tag"] == "looper"
    with stream(server, box, "Connect", {"process": {"pid": pid}}) as s:
        assert started(s) == pid
        signal = {"process": {"tag": "looper"}, "signal": "SIGNAL_SIGKILL"}
        ok(unary(server, box, "SendSignal", signal))
        end = s.rest()[-1]["end"]
    assert end == {"exitCode": -1, "status": "signal: killed"}  # exited false: omitted
    assert pid not in running_pids(server, box)


def test_output_beyond_the_sandboxs_collect_limit_does_not_kill_a_process(
    server: LiveServer, box: str
) -> None:
    # 65 MiB, over the default 64 MiB a caller may collect; nobody follows it meanwhile.
    with stream(server, box, "Start", bash("head -c 68157440 /dev/zero; sleep 3")) as s:
        pid = started(s)
    with stream(server, box, "Connect", {"process": {"pid": pid}}) as s:
        assert started(s) == pid
        assert s.rest()[-1] == {"end": {"exited": True, "status": "exit status 0"}}


def test_two_streams_follow_one_process(server: LiveServer, box: str) -> None:
    with stream(server, box, "Start", {**bash("cat"), "stdin": True}) as first:
        pid = started(first)
        with stream(server, box, "Connect", {"process": {"pid": pid}}) as second:
            assert started(second) == pid
            data = base64.b64encode(b"both").decode()
            ok(unary(server, box, "SendInput", {"process": {"pid": pid}, "input": {"stdin": data}}))
            for s in (first, second):
                event = s.event()
                assert event is not None and base64.b64decode(event["data"]["stdout"]) == b"both"
            ok(unary(server, box, "CloseStdin", {"process": {"pid": pid}}))
            assert second.rest()[-1]["end"]["status"] == "exit status 0"
        assert first.rest()[-1]["end"]["status"] == "exit status 0"


def test_unknown_pids_are_not_found(server: LiveServer, box: str) -> None:
    selector = {"process": {"pid": 999999}}
    killed = unary(server, box, "SendSignal", {**selector, "signal": "SIGNAL_SIGKILL"})
    assert killed.status_code == 404 and killed.json()["code"] == "not_found", killed.text
    sent = unary(server, box, "SendInput", {**selector, "input": {"stdin": "aGk="}})
    assert sent.status_code == 404 and sent.json()["code"] == "not_found", sent.text
    with stream(server, box, "Connect", selector) as s:
        assert s.next() is None
        assert s.end is not None and s.end["error"]["code"] == "not_found", s.end


def test_bad_requests_are_refused_with_what_to_send(server: LiveServer, box: str) -> None:
    with stream(server, box, "Start", {"process": {"cmd": ""}}) as s:
        assert s.next() is None
        assert s.end is not None and s.end["error"]["code"] == "invalid_argument", s.end
        assert "process.cmd is empty" in s.end["error"]["message"]
    unspecified = unary(server, box, "SendSignal", {"process": {"pid": 1}})
    assert unspecified.status_code == 400, unspecified.text
    assert "SIGNAL_SIGKILL" in unspecified.json()["message"]
    nobody = unary(server, box, "CloseStdin", {"process": {}})
    assert nobody.status_code == 400 and "pid or a tag" in nobody.json()["message"]


def test_idle_streams_get_keepalives_and_end_at_their_deadline(
    server: LiveServer, box: str
) -> None:
    headers = {"Keepalive-Ping-Interval": "1", "Connect-Timeout-Ms": "2500"}
    with stream(server, box, "Start", bash("sleep 30"), **headers) as s:
        pid = started(s)
        kinds = []
        while (message := s.next()) is not None:
            kinds.extend(message["event"])
    assert "keepalive" in kinds and "end" not in kinds
    assert s.end is not None and s.end["error"]["code"] == "deadline_exceeded", s.end
    assert pid in running_pids(server, box)  # the stream's deadline is not the process's
    ok(unary(server, box, "SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}))


def test_a_killed_sandbox_breaks_the_stream_as_a_transport_failure(server: LiveServer) -> None:
    created = call(server, "Create", {"timeoutSeconds": 120})
    assert created.status_code == 200, created.text
    box = created.json()["sandbox"]["id"]
    failure: list[BaseException] = []
    health: list[int] = []
    with stream(server, box, "Start", bash("sleep 60")) as s:
        started(s)

        def read_to_the_end() -> None:
            try:
                s.rest()
            except BaseException as exc:  # what E2B's SDK sees: the body breaks off
                failure.append(exc)
                # What the SDK does next, at once (its async handle does not wait for the
                # kill call to return): probe /health, which must already say 502.
                probe = httpx.get(f"{server.url}/health", headers=_headers(server, box))
                health.append(probe.status_code)

        reader = threading.Thread(target=read_to_the_end)
        reader.start()
        assert call(server, "Kill", {"sandboxId": box}).status_code == 200
        reader.join(30)
        assert not reader.is_alive()
    assert s.end is None, s.end  # no end envelope, clean or with an error
    # A reset, which E2B's SDK counts as a transport failure (a polite close it does not).
    assert failure and isinstance(failure[0], httpx.ReadError), failure
    assert health == [502]


def pty_output(s: Stream, until: bytes) -> bytes:
    """A terminal's output (data.pty events) until it shows `until`."""
    seen = b""
    while until not in seen:
        event = s.event()
        assert event is not None and "end" not in event, (event, seen)
        seen += base64.b64decode(event["data"]["pty"])
    return seen


def type_in(server: LiveServer, box: str, pid: int, text: bytes) -> None:
    data = base64.b64encode(text).decode()
    ok(unary(server, box, "SendInput", {"process": {"pid": pid}, "input": {"pty": data}}))


def test_a_pty_runs_a_shell_resizes_and_is_reconnected(server: LiveServer, box: str) -> None:
    start = {
        "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"FOO": "bar"}},
        "pty": {"size": {"cols": 80, "rows": 24}},
    }
    with stream(server, box, "Start", start) as s:
        pid = started(s)
        type_in(server, box, pid, b"stty size; echo $TERM-$FOO\n")
        assert b"24 80" in pty_output(s, b"xterm-256color-bar")
        resize = {"process": {"pid": pid}, "pty": {"size": {"cols": 100, "rows": 30}}}
        ok(unary(server, box, "Update", resize))
    # The terminal outlives its stream (the SDK's disconnect); Connect follows it again.
    with stream(server, box, "Connect", {"process": {"pid": pid}}) as s:
        assert started(s) == pid
        type_in(server, box, pid, b"stty size\n")
        assert b"30 100" in pty_output(s, b"30 100")
        type_in(server, box, pid, b"exit\n")
        assert s.rest()[-1]["end"]["status"] == "exit status 0"
