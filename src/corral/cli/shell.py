"""`corral sandbox shell`: an interactive terminal in a sandbox, like `docker exec -it`.

The command runs on a terminal in the sandbox (`sandbox.pty`); this terminal is put in
raw mode so every key (Ctrl-C, Ctrl-D, arrows) goes to the sandbox's terminal as typed,
and is restored on the way out, whatever ends the session. The window size is sent at
the start and again on each SIGWINCH. Without a local terminal (stdin piped) it runs the
same way without raw mode, and the end of stdin is a Ctrl-D. The command dies if this
client goes away (it is not a background command). The exit code is the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from corral.cli._common import add_pairs, connect_kwargs, parse_pairs, usage_error, warn
from corral.errors import NotFound

if TYPE_CHECKING:
    from corral.client import CommandHandle, CommandResult, Sandbox

DEFAULT_SIZE = (80, 24)
EOF = b"\x04"  # what a terminal sends at the end of its input (Ctrl-D)


def shell(args: argparse.Namespace) -> int:
    """Open an interactive terminal in a sandbox (a login shell, or COMMAND); exit with its
    exit code."""
    from corral.client import Sandbox

    stdin = sys.stdin.fileno()
    stdout = sys.stdout.fileno()
    words = _command(args)
    box = Sandbox.connect(args.sandbox_id, resume=False, **connect_kwargs(args))
    try:
        envs = parse_pairs(args.env, "-e")
        # Raw before the start: what the shell first prints, and keys typed meanwhile,
        # already see the terminal as it will be.
        with _raw(stdin), _wakeups() as wake:
            handle = box.pty.create(
                *_window_size(),
                on_data=lambda data: _write_all(stdout, data),
                cmd=words,
                envs=envs,
                cwd=args.cwd,
                user=args.user,
                background=False,
            )
            result = _session(box, handle, stdin, wake)
    finally:
        box.close()
    if result.reason != "exited":
        warn(f"shell ended: {result.reason}", result.error or "")
    code: int = result.exit_code
    return code


def _session(box: Sandbox, handle: CommandHandle, stdin: int, wake: _Wakeups) -> CommandResult:
    """Copy stdin to the terminal until the command ends; resize it on SIGWINCH."""
    ended: list[CommandResult | BaseException] = []

    def wait() -> None:
        try:
            ended.append(handle.wait())
        except BaseException as exc:  # raised in the main thread below
            ended.append(exc)
        wake.ring()

    threading.Thread(target=wait, name="corral-shell-wait", daemon=True).start()
    reading = True
    while not ended:
        readable, _, _ = select.select([stdin, wake.fd] if reading else [wake.fd], [], [])
        if wake.fd in readable and wake.take_resize():
            box.pty.resize(handle.pid, *_window_size())
        if stdin in readable and not ended:
            data = os.read(stdin, 1 << 16)
            if not data:  # piped input ended: the terminal's end of input, once
                reading = False
                data = EOF
            with contextlib.suppress(NotFound):  # it ended meanwhile: wait() says how
                box.pty.send_stdin(handle.pid, data)
    outcome = ended[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _window_size() -> tuple[int, int]:
    """This terminal's (cols, rows), else 80 x 24."""
    for fd in (sys.stdout.fileno(), sys.stdin.fileno(), sys.stderr.fileno()):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.columns > 0 and size.lines > 0:
                return size.columns, size.lines
    return DEFAULT_SIZE


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Raw mode on `fd` if it is a terminal, restored on the way out."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keys typed ahead are kept
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class _Wakeups:
    """A pipe the session's loop selects on: rung by SIGWINCH and by the command's end."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._resized = False

    def ring(self, resized: bool = False) -> None:
        self._resized = self._resized or resized
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"!")

    def take_resize(self) -> bool:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 4096)
        resized, self._resized = self._resized, False
        return resized

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._write)


@contextlib.contextmanager
def _wakeups() -> Iterator[_Wakeups]:
    wake = _Wakeups()
    os.set_blocking(wake.fd, False)
    previous = signal.signal(signal.SIGWINCH, lambda signum, frame: wake.ring(resized=True))
    try:
        yield wake
    finally:
        signal.signal(signal.SIGWINCH, previous)
        wake.close()


def add_shell_options(parser: argparse.ArgumentParser) -> None:
    _add_options(parser)
    # What follows the ID: more options, then -- and the command (`shell ID --user root
    # -- CMD`): argparse cannot mix options with a command of its own options' shape.
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="what to run, after --; default a login shell (bash if the template has it)",
    )


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user", help="who runs it: root, user or a user of the template; default its user"
    )
    parser.add_argument("--cwd", help="the working directory; default /workspace")
    add_pairs(parser, "-e", "--env", help="an environment variable; repeatable")


def _command(args: argparse.Namespace) -> list[str] | None:
    """The command after --, once the options between the ID and -- are in `args`."""
    words = list(args.command)
    if not words or not words[0].startswith("-"):
        return words or None  # (argparse drops a -- that comes right after the ID)
    cut = words.index("--") if "--" in words else len(words)
    options, command = words[:cut], words[cut + 1 :]
    if options:
        late = argparse.ArgumentParser(add_help=False)
        _add_options(late)
        parsed, unknown = late.parse_known_args(options)
        if unknown:
            usage_error(
                f"unexpected {' '.join(unknown)!r}: put the command after --, as in "
                "`corral sandbox shell ID --user root -- bash -l`"
            )
        args.user = parsed.user or args.user
        args.cwd = parsed.cwd or args.cwd
        args.env = [*args.env, *parsed.env]
    return command or None
