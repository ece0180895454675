"""The running command of a one-shot sandbox (see `Entrypoint`).

Its stdout and stderr are the launcher's pipes, read here; its timeout is kept here, on
the host; killing it kills the sandbox's init, which takes every process of the sandbox
with it. It ends when the launcher exits, whose exit status is the command's: a death by
signal N comes through as 128 + N, as a shell reports it, and is told apart that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from typing import Literal

from corral.errors import CommandError, InvalidRequest
from corral.guest import CommandOutput, ExecResult, OutputChunk
from corral.isolation.launcher import Launcher, children

_READ_SIZE = 64 * 1024
Stream = Literal["stdout", "stderr"]
_STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")
_LAST_SIGNAL = 64


class EntryProcess(CommandOutput):
    """The entrypoint's output, signals and result; the same surface as a command the
    guest agent runs, so `Command` wraps either."""

    def __init__(
        self,
        launcher: Launcher,
        timeout: float | None,
        output_limit: int,
        exec_failure: bytes | None,
        signal_fifo: str | None = None,
    ) -> None:
        self.pid = launcher.pid  # a host pid: the launcher's
        self._launcher = launcher
        self._timeout = timeout
        self._output_limit = output_limit
        self._exec_failure = exec_failure
        self._signal_fifo = signal_fifo
        self._kill_reason: str | None = None
        self._stderr_head = b""
        self._output_bytes = 0
        self._result: ExecResult | None = None
        self._ready: deque[OutputChunk] = deque()
        self._reads: dict[asyncio.Future[bytes], Stream] = {
            self._read(name): name for name in _STREAMS
        }
        self._timer = (
            asyncio.get_running_loop().call_later(timeout, self._kill_now, "timeout")
            if timeout
            else None
        )
        launcher.stdin.close()  # the command reads end-of-file, as from /dev/null

    def _read(self, stream: Stream) -> asyncio.Future[bytes]:
        reader = self._launcher.stdout if stream == "stdout" else self._launcher.stderr
        return asyncio.ensure_future(reader.read(_READ_SIZE))

    async def _next_chunk(self) -> OutputChunk | None:
        while not self._ready and self._reads:
            reads = dict(self._reads)
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: _STREAMS.index(reads[f])):
                stream = reads[future]
                if self._reads.pop(future, None) is None or future.cancelled():
                    continue  # closed meanwhile
                data = future.result()
                if not data:
                    continue  # end of file
                if stream == "stderr" and len(self._stderr_head) < 256:
                    self._stderr_head += data[:256]
                room = self._output_limit - self._output_bytes
                if len(data) > room:  # past the limit: keep what fits, end the command
                    data = data[:room]
                    self._kill_now("output_limit")
                if data:
                    self._output_bytes += len(data)
                    self._ready.append(OutputChunk(stream, data))
                self._reads[self._read(stream)] = stream  # read on to the end, discarding
        return self._ready.popleft() if self._ready else None

    async def wait(self) -> ExecResult:
        """Wait for the end, discarding output nobody read."""
        while await self._next_chunk() is not None:
            pass
        if self._result is None:
            code = await self._launcher.wait()
            self.close()
            self._result = self._explain(code)
        return self._result

    def _explain(self, code: int) -> ExecResult:
        if code < 0:  # the launcher itself was killed
            code = 128 - code
        signum = code - 128 if 128 < code <= 128 + _LAST_SIGNAL else None
        if self._kill_reason == "timeout":
            error = f"the command ran longer than its timeout of {self._timeout}s"
            return ExecResult(code, signum, "timeout", self._output_bytes, error)
        if self._kill_reason == "output_limit":
            error = f"the command wrote more than its output limit of {self._output_limit} bytes"
            return ExecResult(code, signum, "output_limit", self._output_bytes, error)
        if self._kill_reason is not None or signum is not None:
            return ExecResult(code, signum, "killed", self._output_bytes)
        failure = self._exec_failure
        if code == 1 and failure and self._stderr_head.startswith(failure):
            # The launcher could not exec the command: say so as a shell would.
            line = self._stderr_head[len(failure) :].split(b"\n")[0].decode(errors="replace")
            name, _, why = line.rpartition(": ")
            missing = why == "No such file or directory"
            error = f"{'command not found' if missing else 'command not executable'}: {name}"
            return ExecResult(127 if missing else 126, None, "exited", 0, error)
        return ExecResult(code, None, "exited", self._output_bytes)

    # -- control ------------------------------------------------------------------------

    def _kill_now(self, reason: str) -> None:
        if self._result is not None:
            return
        self._kill_reason = self._kill_reason or reason
        self._launcher.kill_tree()

    async def kill(self) -> None:
        """SIGKILL the command and every process of its sandbox."""
        self._kill_now("killed")

    async def signal(self, signum: int, *, group: bool = False) -> None:
        """Send `signum` to the command (its whole process group with `group`)."""
        if signum == signal.SIGKILL and group:
            self._kill_now("killed")
            return
        if self._signal_fifo is not None:
            await self._signal_guest(signum, group)
            return
        for init in self._launcher.children():
            # The init's first child is the command; orphans it adopts come after.
            for pid in children(init)[:1]:
                with contextlib.suppress(ProcessLookupError):
                    # The command's group is the session bwrap's init made (--new-session,
                    # the init leads it), or one the command made itself: the group it
                    # is in now. The init ignores the signal: a namespace's init takes
                    # from outside only the signals it handles.
                    if group:
                        os.killpg(os.getpgid(pid), signum)
                    else:
                        os.kill(pid, signum)

    async def _signal_guest(self, signum: int, group: bool) -> None:
        """Hand the signal to the guest's PID 1, which sends it to the command (a command
        that already ended, or a guest gone, takes it as a process that is gone would)."""
        assert self._signal_fifo is not None
        with contextlib.suppress(OSError):  # ENXIO: no reader, the VM is gone
            fd = os.open(self._signal_fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, f"{signum} {int(group)}\n".encode())  # < PIPE_BUF: whole
            finally:
                os.close(fd)

    async def write_stdin(self, data: bytes) -> None:
        raise CommandError("a one-shot sandbox's command reads no stdin")

    async def close_stdin(self) -> None:
        return None

    async def detach(self) -> None:
        raise InvalidRequest("a one-shot sandbox's command cannot be detached; kill it")

    def close(self) -> None:
        """Stop the timer and any pending reads (the end, or the sandbox's destruction)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for future in self._reads:
            future.cancel()
        self._reads.clear()
