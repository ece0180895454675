"""Commands on a pseudo-terminal: the terminal a PTY exec runs on, and its resize.

The command's stdin, stdout and stderr are the terminal's slave side, and it is the
controlling terminal of the command's session: ``posix_spawn`` makes the child a session
leader (``setsid``) before its file actions, so opening the slave by path (without
O_NOCTTY) as fd 0 makes it the controlling terminal, the way ``login_tty`` would after a
fork, while spawning stays as fast as for pipes. The agent reads the master as the
command's one output stream and writes its input there; the line discipline then echoes
it and turns Ctrl-C into SIGINT for the terminal's foreground job, and a resize
(TIOCSWINSZ on the master) sends that job SIGWINCH. Part of the agent: standard library
only, Python 3.9 syntax; ``fcntl``, ``termios`` and ``struct`` are imported on first use,
off the agent's start.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.guest.agent_exec import Identity, Users

try:
    from corral.guest.agent_channels import Refusal
except ImportError:  # run in a sandbox, beside this file
    from agent_channels import Refusal  # type: ignore[no-redef,import-not-found]

DEFAULT_TERM = "xterm-256color"
MAX_CELLS = 65535  # the kernel's struct winsize holds unsigned shorts


def terminal_size(value: object) -> tuple[int, int]:
    """(cols, rows) of a ``{"cols": c, "rows": r}`` argument, both 1..65535."""
    if not isinstance(value, dict):
        raise Refusal("invalid_argument", 'pty must be {"cols": c, "rows": r}')
    size = []
    for key in ("cols", "rows"):
        number = value.get(key)
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= MAX_CELLS:
            raise Refusal(
                "invalid_argument", f"pty {key} must be a number 1..{MAX_CELLS}, not {number!r}"
            )
        size.append(number)
    return size[0], size[1]


def set_size(fd: int, cols: int, rows: int) -> None:
    import fcntl
    import struct
    import termios

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_terminal(size: tuple[int, int], users: Users, ids: Identity) -> tuple[int, int, str]:
    """A new terminal of `size` for a command of `ids`: (master, slave, slave's path).

    The slave belongs to the command's user, who must open it: the agent creates it as
    its file-system user (the template's default), so another user gets it by chown.
    """
    master, slave = os.openpty()  # both close-on-exec: the child opens the slave by path
    try:
        set_size(master, *size)
        users.give_terminal(slave, ids)
        os.set_blocking(master, False)
        return master, slave, os.ttyname(slave)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
