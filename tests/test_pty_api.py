"""Terminals and attach over the API: the wire (Connect JSON) and the SDK, sync and async,
against a real server process and real sandboxes."""

from __future__ import annotations

import asyncio
import base64
import re
import threading
import time

import pytest

from corral import AsyncSandbox, Sandbox
from corral.errors import InvalidRequest, NotFound
from tests.conftest import LiveServer, opts
from tests.kit.connect import call, error, stream

pytestmark = pytest.mark.usefixtures("sandbox_host")

WAIT = 30.0


class Output:
    """Bytes a terminal showed, safe to wait on from the test's thread or loop."""

    def __init__(self) -> None:
        self._data = b""
        self._lock = threading.Lock()

    def add(self, data: bytes) -> None:
        with self._lock:
            self._data += data

    @property
    def text(self) -> str:
        with self._lock:
            return self._data.decode(errors="replace")

    def seen(self, pattern: str) -> bool:
        return re.search(pattern, self.text, re.S) is not None

    def wait(self, pattern: str) -> None:
        deadline = time.monotonic() + WAIT
        while not self.seen(pattern):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text!r}"
            time.sleep(0.02)

    async def await_(self, pattern: str) -> None:
        deadline = time.monotonic() + WAIT
        while not self.seen(pattern):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text!r}"
            await asyncio.sleep(0.02)


# -- the wire -------------------------------------------------------------------------------


def test_exec_with_a_pty_on_the_wire(server: LiveServer, box: str) -> None:
    body = {
        "sandboxId": box,
        "cmd": 'test -t 1 && echo "tty $(stty size) $TERM"',
        "pty": {"cols": 99, "rows": 11},
    }
    messages, end = stream(server, "Exec", body)
    assert end == {}, end
    assert "start" in messages[0] and messages[-1]["end"].get("exitCode", 0) == 0
    output = b"".join(base64.b64decode(m["stdout"]) for m in messages if "stdout" in m)
    assert output == b"tty 11 99 xterm-256color\r\n"
    assert not [m for m in messages if "stderr" in m]  # a terminal is one stream


def test_bad_sizes_and_pids_are_refused_on_the_wire(server: LiveServer, box: str) -> None:
    for size in ({"cols": 0, "rows": 24}, {"cols": 80, "rows": 70000}):
        messages, end = stream(server, "Exec", {"sandboxId": box, "cmd": "true", "pty": size})
        assert messages == [] and end["error"]["code"] == "invalid_argument", end
        assert "1..65535" in end["error"]["message"]
        resize = {"sandboxId": box, "pid": 1, "size": size}
        assert "1..65535" in error(call(server, "Resize", resize), 400, "invalid_argument")
    message = error(
        call(server, "Resize", {"sandboxId": box, "pid": 999999, "size": {"cols": 9, "rows": 9}}),
        404,
        "not_found",
    )
    assert "no running process 999999" in message
    messages, end = stream(server, "Attach", {"sandboxId": box, "pid": 999999})
    assert messages == [] and end["error"]["code"] == "not_found", end


def test_a_non_terminal_command_cannot_be_resized(server: LiveServer, box: str) -> None:
    with Sandbox.connect(box, **opts(server)) as sbx:
        handle = sbx.commands.run("sleep 60", background=True)
        try:
            with pytest.raises(InvalidRequest, match="has no terminal to resize"):
                sbx.pty.resize(handle.pid, 100, 30)
        finally:
            handle.kill()


# -- the SDK --------------------------------------------------------------------------------


def test_sync_pty_create_resize_input_and_exit(server: LiveServer) -> None:
    output = Output()
    with Sandbox.create(timeout=120, **opts(server)) as sbx:
        terminal = sbx.pty.create(80, 24, on_data=output.add, envs={"FOO": "bar"})
        sbx.pty.send_stdin(terminal.pid, 'echo "c=$(tput cols) $FOO $LANG"\n')
        output.wait(r"c=80 bar C\.UTF-8\r\n")
        sbx.pty.resize(terminal.pid, cols=100, rows=24)
        sbx.pty.send_stdin(terminal.pid, b'echo "c=$(tput cols)"; exit\n')
        result = terminal.wait()
        assert result.exit_code == 0
        assert "c=100\r\n" in output.text and "c=100" in result.stdout
        assert terminal.pid not in [p.pid for p in sbx.commands.list()]  # it ended
        with pytest.raises(NotFound):
            sbx.pty.connect(terminal.pid)


def test_sync_pty_reconnect_after_disconnect(server: LiveServer) -> None:
    """E2B's test_connect_to_pty: the terminal outlives its first stream."""
    first, second = Output(), Output()
    with Sandbox.create(timeout=120, **opts(server)) as sbx:
        terminal = sbx.pty.create(on_data=first.add, envs={"FOO": "bar"})
        sbx.pty.send_stdin(terminal.pid, b'echo "v=$FOO"\n')
        first.wait(r"v=bar\r\n")
        terminal.disconnect()
        (info,) = [p for p in sbx.commands.list() if p.pid == terminal.pid]
        assert info.pty and info.envs["FOO"] == "bar" and info.cwd == "/workspace"

        again = sbx.pty.connect(terminal.pid, on_data=second.add)
        assert again.pid == terminal.pid
        sbx.pty.send_stdin(terminal.pid, b'echo "w=$FOO"\nexit\n')
        assert again.wait().exit_code == 0
        assert "w=bar" in second.text and "v=bar" not in second.text


def test_sync_pty_ctrl_c_and_kill(server: LiveServer) -> None:
    output = Output()
    with Sandbox.create(timeout=120, **opts(server)) as sbx:
        terminal = sbx.pty.create(
            on_data=output.add, cmd=["bash", "--norc", "-i"], envs={"PS1": "ready> "}
        )
        output.wait("ready> ")
        sbx.pty.send_stdin(terminal.pid, "sleep 60; echo woke-$((6*7))\n")
        # Wait until sleep runs (its own process group: the terminal's foreground job).
        deadline = time.monotonic() + WAIT
        while "sleep 60" not in sbx.commands.run("ps -eo args").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sbx.pty.send_stdin(terminal.pid, b"\x03")
        sbx.pty.send_stdin(terminal.pid, b"")  # nothing: still fine
        output.wait(r"\^C.*ready> ")
        sbx.pty.send_stdin(terminal.pid, 'echo "rc=$?"\n')
        output.wait(r"rc=130\r\n")
        assert "woke-42" not in output.text
        sbx.pty.kill(terminal.pid)
        assert terminal.wait().reason == "killed"


async def test_async_pty_and_two_attachers_of_a_command(server: LiveServer) -> None:
    async with await AsyncSandbox.create(timeout=120, **opts(server)) as sbx:
        output = Output()
        terminal = await sbx.pty.create(40, 10, on_data=output.add)
        await sbx.pty.send_stdin(terminal.pid, b'stty size; echo "u=$(id -un)"\n')
        await output.await_(r"10 40\r\n.*u=user\r\n")

        lines_a: list[str] = []
        lines_b: list[str] = []
        cmd = "read x; echo got $x; read x; echo got $x"
        handle = await sbx.commands.run(cmd, background=True)
        a = await sbx.commands.connect(handle.pid, on_stdout=lines_a.append)
        b = await sbx.commands.connect(handle.pid, on_stdout=lines_b.append)
        await handle.send_stdin("one\n")
        await sbx.commands.send_stdin(handle.pid, "two\n")
        results = await asyncio.gather(handle.wait(), a.wait(), b.wait())
        assert [r.exit_code for r in results] == [0, 0, 0]
        assert results[0].stdout == "got one\ngot two\n"
        # Each attacher saw everything written after it attached: here, all of it.
        assert lines_a == lines_b == ["got one", "got two"]

        await sbx.pty.send_stdin(terminal.pid, b"exit 4\n")
        assert (await terminal.wait()).exit_code == 4
