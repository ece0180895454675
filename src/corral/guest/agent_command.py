"""A command the guest agent started: its pipes, stdin, output limit, exit and report.

A command ends when its process has exited and its stdout and stderr reached EOF. A
daemon it started may keep those pipes open forever, so once the process has exited
the agent waits at most ``EXIT_GRACE`` seconds for EOF, then reads what the pipes
hold at that moment (as the host's credit allows: nothing written before the exit is
lost to a slow reader) and stops reading them.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from corral.guest.agent import Agent
    from corral.guest.agent_channels import Args

try:
    from corral.guest import protocol
    from corral.guest.agent_channels import EPOLLIN, EPOLLOUT, Channel
except ImportError:  # run in a sandbox, beside this file
    import protocol  # type: ignore[no-redef,import-not-found]
    from agent_channels import EPOLLIN, EPOLLOUT, Channel  # type: ignore[no-redef,import-not-found]

EXIT_GRACE = 2.0


def exit_code_of(status: int) -> tuple[int, int | None]:
    """(exit code, signal) of a wait status; a signal death is 128 + signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return 128 + signum, signum
    return os.WEXITSTATUS(status), None


class Command(Channel):
    """A process the agent started, its pipes, and the channel listening to it (if any)."""

    def __init__(
        self, agent: Agent, channel: int, pid: int, args: Args, pipes: dict[int, int]
    ) -> None:
        super().__init__(agent, channel)
        self.pid = pid
        self.argv: list[str] | None = args.get("argv")
        self.cmd: str | None = args.get("cmd")
        self.tag: str | None = args.get("tag")
        self.background = bool(args.get("background"))
        self.started_at = time.time()
        timeout = args.get("timeout")
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.output_limit: int | None = args.get("output_limit")
        self.output_bytes = 0
        self.credit = protocol.WINDOW
        self.pipes = pipes  # read end -> OUT or ERR
        self.watched: set[int] = set()
        self.stdin_fd: int | None = None
        self.takes_input = False  # started with stdin or on a terminal (`agent_exec`)
        self.stdin_buffer = bytearray()
        # Who queued the buffer's bytes, in order: [channel of an `input` call, or None for
        # the channel following the command, bytes of it still in the buffer].
        self.stdin_parts: list[list[int | None]] = []
        self.stdin_eof = False
        self.status: int | None = None
        self.grace_at: float | None = None  # when to stop waiting for EOF after the exit
        self.past_grace = False
        self.kill_reason: str | None = None
        self.attached = True
        self.cwd: str | None = None
        self.env: dict[str, str | None] | None = args.get("env")
        self.tty: int | None = None  # the master of its terminal (`agent_pty`), if on one

    @property
    def running(self) -> bool:
        return self.status is None

    def start(self) -> None:
        self.update_watches()
        self.agent.send_json(protocol.EVENT, self.channel, {"pid": self.pid})

    # -- output -----------------------------------------------------------------------

    @property
    def flowing(self) -> bool:
        """Whether output may be read now: credit left, or nobody to send it to."""
        return not self.attached or self.credit > 0 or self.kill_reason == "output_limit"

    def update_watches(self) -> None:
        want = self.flowing and not self.past_grace
        for fd in self.pipes:
            if want and fd not in self.watched:
                self.agent.watch(fd, EPOLLIN, self.on_pipe)
                self.watched.add(fd)
            elif not want and fd in self.watched:
                self.agent.unwatch(fd)
                self.watched.discard(fd)

    def on_pipe(self, fd: int, events: int = 0) -> bool:
        """Read one chunk from a pipe; False when it had nothing to give."""
        over = self.kill_reason == "output_limit"
        size = protocol.CHUNK
        if self.attached and not over:
            size = min(size, self.credit)
        limit = self.output_limit
        if limit is not None and not over:
            size = min(size, limit - self.output_bytes + 1)  # one more byte shows overflow
        if size <= 0:
            return False
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self.close_pipe(fd)
            self.finish_if_done()
            return False
        if over:
            return True  # beyond the limit: drained, never sent
        if limit is not None and self.output_bytes + len(data) > limit:
            data = data[: limit - self.output_bytes]
            # Output was dropped: say so even when the command had already exited.
            self.kill_reason = self.kill_reason or "output_limit"
            self.kill("output_limit")
        self.output_bytes += len(data)
        if self.attached and data:
            self.agent.send(self.pipes[fd], self.channel, data)
            self.credit -= len(data)
            if not self.credit:
                self.update_watches()
        return True

    def close_pipe(self, fd: int) -> None:
        if fd in self.watched:
            self.agent.unwatch(fd)
            self.watched.discard(fd)
        del self.pipes[fd]
        os.close(fd)
        if fd == self.tty:
            self.tty = -1  # on a terminal still, but one that is gone: no resize

    def on_credit(self, amount: int) -> None:
        self.credit += amount
        if self.past_grace:
            self.drain_after_grace()
        else:
            self.update_watches()

    def drain_after_grace(self) -> None:
        """Past the exit grace: read what the pipes hold now, then stop reading them."""
        self.grace_at = None
        self.past_grace = True
        self.update_watches()
        for fd in list(self.pipes):
            while fd in self.pipes:
                if not self.flowing:
                    return  # resumes in on_credit
                if not self.on_pipe(fd) and fd in self.pipes:
                    self.close_pipe(fd)
        self.finish_if_done()

    # -- stdin ------------------------------------------------------------------------

    def on_in(self, data: bytes) -> None:
        self.feed(data, None)

    def feed(self, data: bytes, caller: int | None) -> None:
        """Queue bytes for the command's stdin: from the channel following it (`caller`
        None: its credit comes back as they are written) or from an `input` call on
        channel `caller`, answered once they are all written."""
        if self.stdin_fd is None or self.stdin_eof:
            if caller is None:
                self.agent.grant(self.channel, len(data))
            else:
                self.answer_input(caller, len(data))
            return
        if not data:
            if caller is not None:
                self.answer_input(caller, 0)
            return
        self.stdin_buffer += data
        self.stdin_parts.append([caller, len(data)])
        if len(self.stdin_buffer) == len(data):
            self.on_stdin_writable(self.stdin_fd)

    def on_stdin_writable(self, fd: int, events: int = 0) -> None:
        written = 0
        try:
            while self.stdin_buffer:
                n = os.write(fd, self.stdin_buffer)
                del self.stdin_buffer[:n]
                written += n
        except BlockingIOError:
            pass
        except OSError:  # the command closed its stdin: drop what it will never read
            self.settle(written)
            self.stdin_eof = True
            self.close_stdin()
            return
        self.settle(written)
        if self.stdin_buffer:
            self.agent.watch(fd, EPOLLOUT, self.on_stdin_writable)
        else:
            self.agent.unwatch(fd)
            if self.stdin_eof:
                self.close_stdin()

    def settle(self, count: int, dropped: bool = False) -> None:
        """The first `count` bytes queued for stdin are gone (written, or `dropped`): give
        the following channel its credit back, answer the `input` calls now done."""
        own = 0
        while count and self.stdin_parts:
            part = self.stdin_parts[0]
            n = min(count, part[1] or 0)
            part[1] = (part[1] or 0) - n
            count -= n
            if part[0] is None:
                own += n
            if not part[1]:
                del self.stdin_parts[0]
                if part[0] is not None:
                    self.answer_input(part[0], n if dropped else 0)
        if own and self.attached:
            self.agent.grant(self.channel, own)

    def answer_input(self, channel: int, lost: int) -> None:
        """Reply to an `input` call: done, or `lost` bytes never reached the command."""
        if not lost:
            self.agent.reply(channel, {"ok": True})
            return
        message = (
            f"process {self.pid} has closed its stdin or ended; {lost} bytes of input "
            "were not written"
        )
        error = {"type": "not_running", "message": message}
        self.agent.reply(channel, {"ok": False, "error": error})

    def on_eof(self) -> None:
        self.stdin_eof = True
        if not self.stdin_buffer:
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            self.agent.unwatch(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None
        # Bytes the command will never read: the host may move on.
        self.settle(len(self.stdin_buffer), dropped=True)
        self.stdin_buffer.clear()

    # -- life and death ---------------------------------------------------------------

    def kill(self, reason: str | None) -> None:
        """SIGKILL the command's process group (reason: why the agent did it)."""
        if self.running:
            if self.kill_reason is None:
                self.kill_reason = reason
            self.agent.sweep(self.pid)

    def on_close(self) -> None:
        """The host stopped listening: a foreground command dies, a background one goes on
        with its stdin open (`input` by pid still reaches it), for whoever attaches next."""
        self.attached = False
        if not self.background:
            self.kill(None)
            self.close_stdin()
        self.update_watches()

    def attach(self, channel: int) -> None:
        self.channel = channel
        self.attached = True
        self.credit = protocol.WINDOW
        self.start()

    def exited(self, status: int) -> None:
        self.status = status
        self.grace_at = time.monotonic() + EXIT_GRACE
        self.close_stdin()
        self.finish_if_done()

    def finish_if_done(self) -> None:
        if self.status is None or self.pipes:
            return
        self.agent.commands.pop(self.pid, None)
        if not self.attached:
            return
        code, signum = exit_code_of(self.status)
        reason = self.kill_reason or ("killed" if signum else "exited")
        result: Args = {
            "ok": True,
            "exit_code": code,
            "signal": signum,
            "reason": reason,
            "output_bytes": self.output_bytes,
        }
        if reason == "timeout":
            result["error"] = f"the command ran longer than its timeout of {self.timeout}s"
        elif reason == "output_limit":
            result["error"] = (
                f"the command wrote more than its output limit of {self.output_limit} bytes"
            )
        self.attached = False
        self.agent.reply(self.channel, result)

    def describe(self) -> Args:
        return {
            "pid": self.pid,
            "argv": self.argv,
            "cmd": self.cmd,
            "tag": self.tag,
            "background": self.background,
            "started_at": self.started_at,
            "cwd": self.cwd,
            "env": self.env,
            "pty": self.tty is not None,
        }
