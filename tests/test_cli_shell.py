"""`corral sandbox shell`, run as a subprocess on a real terminal (a pty this test opens)
against a live server: raw mode, window size, Ctrl-C, exit codes; and with piped stdin."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import sys
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import LiveServer
from tests.kit import processes

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("sandbox_host")]

WAIT = 30.0


def set_window(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    """The CLI on a terminal of its own: what it shows, and a keyboard."""

    def __init__(self, server: LiveServer, *args: str, cols: int, rows: int) -> None:
        self.master, slave = os.openpty()
        set_window(slave, cols, rows)
        self.process = processes.spawn(
            [sys.executable, "-m", "corral.cli", "sandbox", "shell", *args],
            env={**server.env, "CORRAL_SERVER": server.url, "CORRAL_API_KEY": server.key},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self._data = b""
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the CLI closed its end
                return
            if not data:
                return
            with self._lock:
                self._data += data

    @property
    def text(self) -> str:
        with self._lock:
            return self._data.decode(errors="replace")

    def expect(self, pattern: str, start: int = 0) -> None:
        deadline = time.monotonic() + WAIT
        while re.search(pattern, self.text[start:], re.S) is None:
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text!r}"
            assert self.process.poll() is None, f"the CLI ended: {self.text!r}"
            time.sleep(0.02)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def local_mode(self) -> int:
        """The local terminal's lflag (ICANON and ECHO are off in raw mode)."""
        return int(termios.tcgetattr(self.master)[3])

    def close(self) -> None:
        os.close(self.master)


@pytest.fixture
def terminals(server: LiveServer) -> Iterator[list[Terminal]]:
    made: list[Terminal] = []
    yield made
    for terminal in made:
        processes.stop(terminal.process, signal.SIGKILL, 10)
        terminal.close()


def test_shell_on_a_terminal(server: LiveServer, box: str, terminals: list[Terminal]) -> None:
    cooked = termios.ICANON | termios.ECHO
    term = Terminal(server, box, "--", "bash", "--norc", "-i", cols=100, rows=30)
    terminals.append(term)
    term.expect(r"\$ |# ")
    assert term.local_mode() & cooked == 0  # raw: every key goes to the sandbox as typed
    term.type(b'echo "cols=$(tput cols) rows=$(tput lines) $TERM"\r')
    term.expect(r"cols=100 rows=30 xterm-256color\r\n")

    set_window(term.master, 132, 43)  # the window grew: the kernel would send SIGWINCH
    os.kill(term.process.pid, signal.SIGWINCH)
    mark = len(term.text)
    deadline = time.monotonic() + WAIT
    while "cols=132 rows=43" not in term.text[mark:]:  # the resize reaches the sandbox
        assert time.monotonic() < deadline, term.text
        term.type(b'echo "cols=$(tput cols) rows=$(tput lines)"\r')
        time.sleep(0.3)

    mark = len(term.text)
    term.type(b"sleep 60; echo woke-$((6*7))\r")
    deadline = time.monotonic() + WAIT  # until sleep runs (a Ctrl-C before: the line's)
    while "sleep 60" not in server.corral("sandbox", "exec", box, "--", "ps", "-eo", "args").stdout:
        assert time.monotonic() < deadline, term.text
        time.sleep(0.05)
    term.type(b"\x03")  # Ctrl-C: to the sandbox's foreground job, not to the CLI
    term.type(b'echo "rc=$?"\r')
    term.expect(r"rc=130\r\n", mark)
    assert "woke-42" not in term.text and term.process.poll() is None

    term.type(b"exit 3\r")
    assert term.process.wait(WAIT) == 3  # the shell's exit code
    assert term.local_mode() & cooked == cooked  # the terminal is restored


def test_shell_as_root_with_a_login_shell(
    server: LiveServer, box: str, terminals: list[Terminal]
) -> None:
    term = Terminal(server, box, "--user", "root", cols=80, rows=24)
    terminals.append(term)
    term.type(b'echo "id=$(id -u)"; exit\r')
    term.expect(r"id=0\r\n")
    assert term.process.wait(WAIT) == 0


def test_shell_restores_the_terminal_when_the_sandbox_is_unknown(
    server: LiveServer, terminals: list[Terminal]
) -> None:
    term = Terminal(server, "sb_nosuchsandbox", cols=80, rows=24)
    terminals.append(term)
    before = term.local_mode()
    assert term.process.wait(WAIT) == 4  # EXIT_NOT_FOUND
    assert "sb_nosuchsandbox" in term.text
    assert term.local_mode() == before


def test_shell_with_piped_stdin(server: LiveServer, box: str) -> None:
    done = server.corral("sandbox", "shell", box, input='echo "hi-$((6*7))"\nexit 5\n')
    assert done.returncode == 5, done.stderr
    assert "hi-42" in done.stdout
    # The end of the input is a Ctrl-D: the shell ends with it.
    done = server.corral("sandbox", "shell", box, "--", "cat", input="one\ntwo\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("one") == 2  # the terminal's echo, then cat's copy
    assert done.stdout.replace("\r\n", "\n").endswith("one\ntwo\n")


def test_shell_dies_with_its_client(server: LiveServer, box: str) -> None:
    tag = f"marker-{time.time_ns()}"
    process = server.cli_process("sandbox", "shell", box, "--", "sh", "-c", f"sleep 300 # {tag}")
    try:
        deadline = time.monotonic() + WAIT
        while tag not in server.corral("sandbox", "ps", box).stdout:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
    finally:
        processes.stop(process, signal.SIGKILL, 10)
    deadline = time.monotonic() + WAIT
    while tag in server.corral("sandbox", "ps", box).stdout:
        assert time.monotonic() < deadline, "the shell outlived its client"
        time.sleep(0.1)
