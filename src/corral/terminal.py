"""A terminal's size: what the engine, the server and the SDK say of a PTY command's
terminal, in one type."""

from __future__ import annotations

from dataclasses import dataclass

from corral.errors import InvalidRequest

MAX_CELLS = 65535  # the kernel's struct winsize holds unsigned shorts


@dataclass(frozen=True)
class PtySize:
    """A terminal's size in character cells. A command given one runs on a
    pseudo-terminal: its output is one stream (stdout), its input goes to the terminal."""

    cols: int
    rows: int

    def __post_init__(self) -> None:
        for name, value in (("cols", self.cols), ("rows", self.rows)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CELLS:
                raise InvalidRequest(
                    f"pty {name}={value!r}: a terminal size is 1..{MAX_CELLS} cells each way"
                )
