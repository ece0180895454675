"""A small blocking client of QEMU's machine protocol (QMP) on a unix socket.

Commands are JSON lines; asynchronous events interleaved with the answers are skipped.
File descriptors go with a command (`getfd`) as SCM_RIGHTS on the same socket: that is
how a QEMU under `-sandbox spawn=deny` gets a file it cannot open itself.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from corral.errors import SandboxError


class QmpError(SandboxError):
    """QEMU refused a QMP command, or its monitor went away."""


class Qmp:
    """One QMP session; `close` it (or use it as a context manager)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
            self._file = self._sock.makefile("rb")
            self._read()  # the greeting
            self.command("qmp_capabilities")
        except (OSError, ValueError) as exc:
            self._sock.close()
            raise QmpError(f"could not talk to QEMU's monitor at {path}: {exc}") from None

    def command(
        self, name: str, arguments: Mapping[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> Any:
        """Run `name` and return its `return` value; QmpError if QEMU refuses it. `fds`
        go with it (SCM_RIGHTS), for `getfd`."""
        line = json.dumps({"execute": name, "arguments": dict(arguments or {})}).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self._sock, [line], list(fds))
            else:
                self._sock.sendall(line)
            while True:
                answer = self._read()
                if "error" in answer:
                    raise QmpError(f"QEMU refused {name}: {answer['error'].get('desc')}")
                if "return" in answer:
                    return answer["return"]
        except (OSError, ValueError) as exc:
            raise QmpError(f"QEMU's monitor failed during {name}: {exc}") from None

    def quit(self, timeout: float) -> None:
        """Make QEMU exit, and wait until it has closed its monitor (it is gone then)."""
        self.command("quit")
        self._sock.settimeout(timeout)
        try:
            while self._file.readline():  # events until it closes
                pass
        except ConnectionResetError:
            pass  # closed with its last event unread
        except OSError as exc:
            raise QmpError(f"QEMU did not exit within {timeout:g} s of quit: {exc}") from None

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ValueError("the monitor closed its connection (QEMU exited?)")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise ValueError(f"unexpected message {line!r}")
        return message

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
