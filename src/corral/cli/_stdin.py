"""Whether `corral run` and `corral sandbox exec` pass their stdin to the command.

As `docker run -i` and `ssh` do: piped or redirected stdin is streamed to the command in
chunks and closed at its end; a terminal is not read unless asked (`--stdin`), so an
interactive `corral run -- ls` does not wait on the keyboard.
"""

from __future__ import annotations

import functools
import os
import sys
from argparse import ArgumentParser, BooleanOptionalAction
from collections.abc import Iterator


def add_stdin_option(parser: ArgumentParser) -> None:
    parser.add_argument(
        "-i",
        "--stdin",
        action=BooleanOptionalAction,
        default=None,
        help="pass this stdin to the command; default: yes unless it is a terminal",
    )


def stdin_source(forward: bool | None) -> Iterator[bytes] | None:
    """The chunks of this process's stdin to feed the command, or None to feed nothing."""
    from corral.client._input import CHUNK

    if sys.stdin is None or forward is False:
        return None
    try:
        fd = sys.stdin.fileno()
        terminal = os.isatty(fd)
    except (OSError, ValueError):  # stdin closed: nothing to pass
        return None
    if terminal and not forward:
        return None
    # os.read returns what is there (up to CHUNK) without waiting to fill it; b"" at EOF.
    return iter(functools.partial(os.read, fd, CHUNK), b"")
