"""The guest agent: runs inside every sandbox and serves the host over one framed stream.

Started by the host as ``python3 -E -s -S agent.py --workdir /workspace`` (or by importing
this module and calling `main`). It reads frames from stdin, writes frames to stdout
(see `protocol` for the wire format) and keeps stderr for diagnostics. `Agent` takes two
file descriptors, so another transport (vsock) only needs another `main`.

Standard library only, Python 3.9 syntax, and quick to start: it is on the critical path
of every sandbox creation, so it avoids ``subprocess``, ``selectors``, ``json``, ``signal``
(all pull in ``re`` or ``enum``) and uses ``posix_spawn``, ``epoll`` and ``_signal``.

Choices worth knowing:

* Commands run in their own session (process group) with ``oom_score_adj`` 1000, so the
  kernel's OOM killer takes them before the agent. ``posix_spawn`` cannot run code in
  the child, so the agent raises its own score for the spawn and restores it as soon as
  ``posix_spawn`` returns: the child inherits 1000 from birth. That is ~2x faster than a Python
  ``fork`` with a pre-exec step, and ~2x faster than an extra ``/bin/sh`` exec. The agent
  keeps the score it started with: an unprivileged process may not go below the floor
  (``oom_score_adj_min``) it inherited, and its children inherit that floor too, so a
  lower agent score set with privilege would only let sandbox code lower its own to the
  same value (and below the host's processes in a host-wide OOM). An agent that cannot
  set the score refuses to start.
* As the pid namespace's init, the agent gets from inside the sandbox only the signals
  it has a handler for; it keeps one for SIGCHLD alone (Python's SIGINT handler would
  turn ``kill -INT 1`` into a KeyboardInterrupt).
* File operations never block the loop: files are opened with ``O_NONBLOCK`` (a FIFO
  opens, or fails, at once) and anything but a regular file is refused. A rename across
  mounts is a copy (`Move`), made a slice of time per turn of the loop.
* A command ends when its process has exited and its stdout and stderr reached EOF. A
  daemon it started may keep those pipes open forever, so once the process has exited
  the agent waits at most ``EXIT_GRACE`` seconds for EOF, then reads what the pipes
  hold at that moment (as the host's credit allows: nothing written before the exit is
  lost to a slow reader) and stops reading them.
* The agent reaps every child with ``waitpid(-1)``, so it can serve as PID 1.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal
    from collections.abc import Callable
    from typing import Any

    Args = dict[str, Any]
else:
    try:
        import _signal as signal  # the C module: `signal` itself imports enum (~4 ms)
    except ImportError:
        import signal

try:
    from corral.guest import protocol
except ImportError:
    import protocol  # type: ignore[no-redef,import-not-found]  # run in a sandbox, beside protocol.py

EXIT_GRACE = 2.0
# How many times a killed process group is swept again before the agent gives up (~10 s).
SWEEP_ATTEMPTS = 30
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_HIGH_WATER = 1 << 20  # stop pumping files to the host while this much is unsent
COMMAND_OOM_SCORE = b"1000"  # the OOM killer's first choice: commands, never the agent
LIST_BATCH = 1000
LIST_MAX_ENTRIES = 100_000
MOVE_SLICE = 0.005  # seconds of copying per turn of the loop: other calls go on meanwhile
MOVE_CHUNK = 1 << 20
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT

_ERRNO_TYPES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "exists",
    errno.ENOTDIR: "not_a_directory",
    errno.EISDIR: "is_a_directory",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.ENOTEMPTY: "not_empty",
    errno.ENOSPC: "no_space",
    errno.EDQUOT: "no_space",
    errno.EFBIG: "no_space",
    errno.ENAMETOOLONG: "invalid_argument",
    errno.ELOOP: "invalid_argument",
    errno.EINVAL: "invalid_argument",
    errno.EBUSY: "invalid_argument",
    errno.ENXIO: "invalid_argument",  # a FIFO nobody reads, a socket: see open_regular
}
# Errors whose kind alone would not tell the caller what to do instead.
_ERRNO_HINTS = {
    errno.EBUSY: "{path} is a mount point or in use by the sandbox; it cannot be removed "
    "or replaced",
}
_HINTS = {
    "not_found": "{path} does not exist in the sandbox; check the path",
    "exists": "{path} already exists in the sandbox; remove it first or pick another path",
    "not_a_directory": "a component of {path} is not a directory; check the path",
    "is_a_directory": "{path} is a directory; this needs a file",
    "permission_denied": "the sandbox user may not do this to {path} ({reason})",
    "not_empty": "directory {path} is not empty; remove it with recursive=True",
    "no_space": "no space left writing {path}; raise the sandbox's disk limit or delete files",
}


class Refusal(Exception):
    """A CALL the agent answers with an error REPLY of this type."""

    def __init__(self, kind: str, message: str, unknown_op: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.unknown_op = unknown_op  # the op named in the CALL, when the agent has none


def refusal_from_os_error(exc: OSError) -> Refusal:
    kind = _ERRNO_TYPES.get(exc.errno or 0, "internal")
    path = exc.filename if exc.filename is not None else "the path"
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = _ERRNO_HINTS.get(exc.errno or 0) or _HINTS.get(kind, "{path}: {reason}")
    return Refusal(kind, hint.format(path=path, reason=reason))


def open_regular(path: str, flags: int, mode: int = 0o644) -> tuple[int, os.stat_result]:
    """Open a regular file for the file ops, never blocking the agent's loop.

    A FIFO's open blocks until the other end opens it, and its reads and writes block or
    never end, as do a device's (/dev/zero): O_NONBLOCK makes the open return (or fail
    with ENXIO) at once, and fstat on what was opened refuses all but regular files.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, a socket: name what it is
            raise not_regular(path, os.stat(path).st_mode) from None
        raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Refusal("is_a_directory", f"{path} is a directory; this needs a file (list it)")
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def not_regular(path: str, mode: int) -> Refusal:
    return Refusal(
        "invalid_argument",
        f"{path} is {special_kind(mode)}: file operations read and write regular files only "
        "(reading or writing it could block forever); use a command for it",
    )


def special_kind(mode: int) -> str:
    """What a file that is neither a regular file, a directory nor a symlink is."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def entry_of(path: str, st: os.stat_result | None = None) -> dict[str, Any]:
    """The JSON entry of one file, with lstat semantics."""
    if st is None:
        st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        kind = "file"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISLNK(mode):
        kind = "symlink"
    else:
        kind = "other"
    entry = {
        "name": os.path.basename(path) or path,
        "path": path,
        "type": kind,
        "size": st.st_size,
        "mode": stat.S_IMODE(mode),
        "mtime": st.st_mtime,
    }
    if kind == "symlink":
        entry["symlink_target"] = os.readlink(path)
    return entry


def remove_tree(top: str) -> None:
    """Remove a directory and everything under it, never following a symlink."""
    stack = [(top, False)]
    while stack:
        path, emptied = stack.pop()
        if emptied:
            os.rmdir(path)
            continue
        stack.append((path, True))
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


def exit_code_of(status: int) -> tuple[int, int | None]:
    """(exit code, signal) of a wait status; a signal death is 128 + signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return 128 + signum, signum
    return os.WEXITSTATUS(status), None


class Channel:
    """What one open channel carries; the defaults ignore what it does not expect."""

    def __init__(self, agent: Agent, channel: int) -> None:
        self.agent = agent
        self.channel = channel

    def on_in(self, data: bytes) -> None:
        self.agent.grant(self.channel, len(data))

    def on_eof(self) -> None:
        pass

    def on_credit(self, amount: int) -> None:
        pass

    def on_close(self) -> None:
        pass


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
        self.stdin_buffer = bytearray()
        self.stdin_eof = False
        self.status: int | None = None
        self.grace_at: float | None = None  # when to stop waiting for EOF after the exit
        self.past_grace = False
        self.kill_reason: str | None = None
        self.attached = True

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
        if self.stdin_fd is None or self.stdin_eof:
            self.agent.grant(self.channel, len(data))
            return
        self.stdin_buffer += data
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
            written += len(self.stdin_buffer)
            self.stdin_buffer.clear()
            self.stdin_eof = True
        if written and self.attached:
            self.agent.grant(self.channel, written)
        if self.stdin_buffer:
            self.agent.watch(fd, EPOLLOUT, self.on_stdin_writable)
        else:
            self.agent.unwatch(fd)
            if self.stdin_eof:
                self.close_stdin()

    def on_eof(self) -> None:
        self.stdin_eof = True
        if not self.stdin_buffer:
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.stdin_fd is not None:
            self.agent.unwatch(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None
            if self.attached:  # bytes the command will never read: the host may move on
                self.agent.grant(self.channel, len(self.stdin_buffer))
            self.stdin_buffer.clear()

    # -- life and death ---------------------------------------------------------------

    def kill(self, reason: str | None) -> None:
        """SIGKILL the command's process group (reason: why the agent did it)."""
        if self.running:
            if self.kill_reason is None:
                self.kill_reason = reason
            self.agent.sweep(self.pid)

    def on_close(self) -> None:
        """The host stopped listening: a foreground command dies, a background one goes on."""
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
        }


class FileDownload(Channel):
    """A ``read``: file content to the host in OUT chunks, as fast as its credit allows."""

    def __init__(self, agent: Agent, channel: int, fd: int, offset: int, length: int | None):
        super().__init__(agent, channel)
        self.fd = fd
        self.position = offset
        self.remaining = length
        self.credit = protocol.WINDOW
        self.sent = 0

    @property
    def ready(self) -> bool:
        return self.credit > 0

    def pump(self) -> None:
        size = min(protocol.CHUNK, self.credit)
        if self.remaining is not None:
            size = min(size, self.remaining)
        try:
            data = os.pread(self.fd, size, self.position) if size else b""
        except OSError as exc:
            self.on_close()
            self.agent.reply_error(self.channel, refusal_from_os_error(exc))
            return
        if not data:
            self.on_close()
            self.agent.reply(self.channel, {"ok": True, "bytes": self.sent})
            return
        self.agent.send(protocol.OUT, self.channel, data)
        self.position += len(data)
        self.sent += len(data)
        self.credit -= len(data)
        if self.remaining is not None:
            self.remaining -= len(data)

    def on_credit(self, amount: int) -> None:
        self.credit += amount

    def on_close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.agent.downloads.remove(self)


class FileUpload(Channel):
    """A ``write``: IN chunks to a temporary file, renamed into place on EOF."""

    def __init__(self, agent: Agent, channel: int, path: str, mode: int, append: bool):
        super().__init__(agent, channel)
        self.path = path
        self.mode = mode
        self.written = 0
        if append:
            self.temp = None
            self.fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)[0]
        else:
            directory, name = os.path.split(path)
            self.temp = os.path.join(directory, f".{name}.corral-{os.getpid()}-{channel}.tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                self.fd = os.open(self.temp, flags, 0o600)
            except OSError as exc:
                exc.filename = path
                raise

    def on_in(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            exc.filename = self.path
            self.fail(refusal_from_os_error(exc))
            return
        self.written += len(data)
        self.agent.grant(self.channel, len(data))

    def on_eof(self) -> None:
        try:
            if self.temp is not None:
                os.fchmod(self.fd, self.mode)
            os.close(self.fd)
            self.fd = -1
            if self.temp is not None:
                os.replace(self.temp, self.path)
                self.temp = None
            entry = entry_of(self.path)
        except OSError as exc:
            exc.filename, exc.filename2 = self.path, None
            self.fail(refusal_from_os_error(exc))
            return
        self.agent.reply(self.channel, {"ok": True, "bytes": self.written, "entry": entry})

    def fail(self, refusal: Refusal) -> None:
        self.on_close()
        self.agent.reply_error(self.channel, refusal)

    def on_close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp is not None:
            try:  # noqa: SIM105 (contextlib would slow the agent's start)
                os.unlink(self.temp)
            except OSError:
                pass
            self.temp = None


class Move(Channel):
    """A ``rename`` across mounts (/workspace, /tmp, the home): copy, then remove, as mv.

    rename(2) cannot cross mounts (EXDEV). The copy goes to a hidden sibling of `dst`,
    MOVE_SLICE of work per turn of the loop, so a big tree never stalls other calls; one
    rename(2) then puts it in place with rename's own rules (a file replaces a file, a
    directory an empty directory), and only then is the source removed. A failure (no
    space, say) discards the copy and leaves the source as it was. Symlinks stay
    symlinks, modes and times are kept; hard links within the tree become separate files.
    """

    def __init__(self, agent: Agent, channel: int, src: str, dst: str, overwrite: bool):
        super().__init__(agent, channel)
        self.src = src
        self.dst = dst
        self.overwrite = overwrite
        top = os.lstat(src)
        self.device = top.st_dev
        self.src_is_dir = stat.S_ISDIR(top.st_mode)
        if not os.access(os.path.dirname(src) or "/", os.W_OK):
            # Checked before copying: otherwise the copy would be made, and the source stay.
            raise Refusal(
                "permission_denied",
                f"{src} cannot be moved: the sandbox user may not remove it from its directory",
            )
        self.refuse_replacing(dst)
        directory, name = os.path.split(dst)
        self.temp: str | None = os.path.join(
            directory, f".{name}.corral-{os.getpid()}-{channel}.tmp"
        )
        self.pending = [(src, self.temp)]  # entries still to copy, depth first
        # Directories copied, parents first: (the copy, the source, the source's stat).
        self.dirs: list[tuple[str, str, os.stat_result]] = []
        self.current = self.temp  # the copy being made, named in errors
        self.reader = -1
        self.writer = -1
        self.file_stat: os.stat_result | None = None

    def refuse_replacing(self, dst: str) -> None:
        """Fail early, before any copying, as the final rename(2) would fail late."""
        try:
            target = os.lstat(dst)
        except FileNotFoundError:
            return
        if self.src_is_dir and not stat.S_ISDIR(target.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), dst)
        if stat.S_ISDIR(target.st_mode):
            if not self.src_is_dir:
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), dst)
            if os.listdir(dst):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), dst)

    def pump(self) -> None:
        """Copy for one slice of time; finish when all is copied; fail on an error."""
        deadline = time.monotonic() + MOVE_SLICE
        try:
            while time.monotonic() < deadline:
                if self.writer >= 0:
                    self.copy_chunk()
                elif self.pending:
                    self.copy_entry(*self.pending.pop())
                else:
                    self.finish()
                    return
        except Refusal as refusal:
            self.fail(refusal)
        except OSError as exc:
            if exc.filename is None:  # a read or write: the file being copied
                exc.filename = self.current
            temp = self.temp
            if temp and isinstance(exc.filename, str) and exc.filename.startswith(temp):
                exc.filename = self.dst + exc.filename[len(temp) :]  # name no hidden copy
            exc.filename2 = None
            self.fail(refusal_from_os_error(exc))

    def copy_entry(self, src: str, dst: str) -> None:
        self.current = dst
        st = os.lstat(src)
        mode = st.st_mode
        if st.st_dev != self.device:  # a mount point inside the tree: it cannot be removed
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), src)
        if stat.S_ISDIR(mode):
            os.mkdir(dst, 0o700)  # its own mode once its content is in
            self.dirs.append((dst, src, st))
            with os.scandir(src) as entries:
                self.pending.extend((e.path, os.path.join(dst, e.name)) for e in entries)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif stat.S_ISREG(mode):
            self.reader = open_regular(src, os.O_RDONLY | os.O_NOFOLLOW)[0]
            self.writer = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self.file_stat = st
        else:
            raise Refusal(
                "unsupported",
                f"{src} is {special_kind(mode)}: moving one across mounts is not supported; "
                "move it within its mount, or create it anew where it should be",
            )

    def copy_chunk(self) -> None:
        data = os.read(self.reader, MOVE_CHUNK)
        view = memoryview(data)
        while view:
            view = view[os.write(self.writer, view) :]
        if data:
            return
        st = self.file_stat
        assert st is not None
        os.fchmod(self.writer, stat.S_IMODE(st.st_mode))
        os.utime(self.writer, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.close_files()

    def finish(self) -> None:
        temp = self.temp
        assert temp is not None
        self.current = temp
        for path, _src, st in reversed(self.dirs):  # children first: a parent may be read-only
            os.chmod(path, stat.S_IMODE(st.st_mode))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        if not self.overwrite and os.path.lexists(self.dst):  # created while we copied
            raise Refusal("exists", f"{self.dst} already exists; pass overwrite=True to replace it")
        os.rename(temp, self.dst)
        self.temp = None
        self.agent.moves.remove(self)
        try:
            if self.src_is_dir:
                for _copy, path, st in self.dirs:  # a read-only directory is moved all the same
                    if st.st_mode & 0o700 != 0o700:
                        os.chmod(path, 0o700)
                remove_tree(self.src)
            else:
                os.unlink(self.src)
        except OSError as exc:
            refusal = refusal_from_os_error(exc)
            message = f"{self.src} was copied to {self.dst} but not all removed: {refusal}"
            self.agent.reply_error(self.channel, Refusal(refusal.kind, message))
            return
        self.agent.reply(self.channel, {"ok": True, "entry": entry_of(self.dst)})

    def fail(self, refusal: Refusal) -> None:
        self.on_close()
        self.agent.reply_error(self.channel, refusal)

    def close_files(self) -> None:
        for fd in (self.reader, self.writer):
            if fd >= 0:
                os.close(fd)
        self.reader = self.writer = -1

    def on_close(self) -> None:
        """Failed, or the host stopped waiting: discard the copy, keep the source."""
        self.close_files()
        if self in self.agent.moves:
            self.agent.moves.remove(self)
        temp, self.temp = self.temp, None
        if temp is None:
            return
        for path, _src, _st in self.dirs:  # a copied mode may forbid removing what is inside
            try:  # noqa: SIM105 (contextlib would slow the agent's start)
                os.chmod(path, 0o700)
            except OSError:
                pass
        try:
            if stat.S_ISDIR(os.lstat(temp).st_mode):
                remove_tree(temp)
            else:
                os.unlink(temp)
        except OSError:
            pass


class OomScore:
    """The agent's own ``oom_score_adj``, which its children inherit at spawn.

    Opened before the agent makes itself non-dumpable: after that its /proc files belong
    to root (of the host, unmapped in the sandbox), and the open would be refused. An
    open descriptor stays writable. `open` checks both writes a spawn makes, so an agent
    that could not protect itself refuses to start instead of failing silently later.
    """

    def __init__(self, fd: int, own: bytes) -> None:
        self.fd = fd
        self.own = own

    @classmethod
    def open(cls) -> OomScore:
        fd = os.open("/proc/self/oom_score_adj", os.O_RDWR | os.O_CLOEXEC)
        try:
            score = cls(fd, os.read(fd, 16).strip() or b"0")
            os.write(fd, COMMAND_OOM_SCORE)
            score.restore()
        except BaseException:
            os.close(fd)
            raise
        return score

    def raise_for_spawn(self) -> None:
        try:
            os.write(self.fd, COMMAND_OOM_SCORE)
        except OSError as exc:
            reason = f"could not give the command oom_score_adj {COMMAND_OOM_SCORE.decode()}"
            raise Refusal("internal", f"{reason}: {exc}") from None

    def restore(self) -> None:
        """Back to the agent's own score; failing leaves it the OOM killer's first choice,
        so the agent says so and stops (the host then sees its sandbox fail)."""
        try:
            os.write(self.fd, self.own)
        except OSError as exc:
            message = f"corral-agent: cannot restore its oom_score_adj ({exc}); exiting\n"
            os.write(2, message.encode())
            os._exit(3)


class Agent:
    """The agent's event loop: frames in on `rfd`, frames out on `wfd`, children between."""

    def __init__(self, rfd: int, wfd: int, workdir: str, oom: OomScore) -> None:
        hide_inherited_fds()
        if wfd == rfd:  # a socket: watch each direction on its own descriptor
            wfd = os.dup(rfd)
        self.rfd = rfd
        self.wfd = wfd
        self.workdir = workdir
        self.poller = select.epoll()
        self.handlers: dict[int, Callable[[int, int], Any]] = {}
        self.decoder = protocol.FrameDecoder()
        self.out = bytearray()
        self.channels: dict[int, Channel] = {}
        self.commands: dict[int, Command] = {}
        # Killed process groups still to sweep: pgid -> (when next, attempts so far).
        self.sweeps: dict[int, tuple[float, int]] = {}
        self.downloads: list[FileDownload] = []
        self.moves: list[Move] = []
        self.base_env = dict(os.environ)
        self.user_name: str | None = None
        self.exit_code: int | None = None
        self.ops: dict[str, Callable[[int, Args], None]] = {
            "ping": self.op_ping,
            "exec": self.op_exec,
            "attach": self.op_attach,
            "signal": self.op_signal,
            "ps": self.op_ps,
            "read": self.op_read,
            "write": self.op_write,
            "list": self.op_list,
            "stat": self.op_stat,
            "mkdir": self.op_mkdir,
            "remove": self.op_remove,
            "rename": self.op_rename,
        }
        self.oom = oom
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        signal.signal(signal.SIGCHLD, _wake)
        # Python's own SIGINT handler raises KeyboardInterrupt: without it, the kernel
        # drops the SIGINT sandbox code sends its pid namespace's init (this agent).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.watch(self.wake_r, EPOLLIN, self.on_children)
        self.watch(rfd, EPOLLIN, self.on_input)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        while self.exit_code is None:
            for fd, events in self.poller.poll(self.next_timeout()):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler(fd, events)
            self.run_timers()
            if len(self.out) < OUTPUT_HIGH_WATER:
                for download in [d for d in self.downloads if d.ready]:
                    download.pump()
            for move in list(self.moves):
                move.pump()
            self.flush()
        for command in list(self.commands.values()):
            if not command.background:
                command.kill(None)
        return self.exit_code

    def next_timeout(self) -> float:
        if self.moves or (
            len(self.out) < OUTPUT_HIGH_WATER and any(d.ready for d in self.downloads)
        ):
            return 0
        soonest = None
        for command in self.commands.values():
            for when in (command.deadline if command.running else None, command.grace_at):
                if when and (soonest is None or when < soonest):
                    soonest = when
        for when, _attempt in self.sweeps.values():
            if soonest is None or when < soonest:
                soonest = when
        if soonest is None:
            return -1
        return max(0.0, soonest - time.monotonic())

    def sweep(self, pgid: int) -> None:
        """SIGKILL a process group now and again until it is empty.

        One killpg can miss children forked while it is delivered (a fork bomb); they
        stay in the group, so repeating it until ESRCH gets them all, even after the
        command's own process has died.
        """
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            self.sweeps.pop(pgid, None)
            return
        attempt = self.sweeps.get(pgid, (0.0, 0))[1] + 1
        if attempt > SWEEP_ATTEMPTS:
            self.sweeps.pop(pgid, None)
            return
        self.sweeps[pgid] = (time.monotonic() + min(0.005 * 2**attempt, 0.5), attempt)

    def run_timers(self) -> None:
        now = time.monotonic()
        for pgid, (when, _attempt) in list(self.sweeps.items()):
            if when <= now:
                self.sweep(pgid)
        for command in list(self.commands.values()):
            if command.deadline is not None and command.deadline <= now and command.running:
                command.deadline = None
                command.kill("timeout")
            if command.grace_at and command.grace_at <= now:
                command.drain_after_grace()

    def watch(self, fd: int, events: int, handler: Callable[[int, int], Any]) -> None:
        if fd in self.handlers:
            self.poller.modify(fd, events)
        else:
            self.poller.register(fd, events)
        self.handlers[fd] = handler

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    def on_children(self, fd: int, events: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            command = self.commands.get(pid)
            if command is not None:
                command.exited(status)

    # -- frames in --------------------------------------------------------------------

    def on_input(self, fd: int, events: int) -> None:
        try:
            data = os.read(fd, 1 << 18)
        except BlockingIOError:
            return
        except OSError as exc:
            self.stop(0, f"reading from the host failed ({exc}); exiting")
            return
        if not data:
            self.stop(0)
            return
        try:
            self.dispatch(self.decoder.feed(data))
        except protocol.ProtocolError as exc:
            self.stop(2, f"protocol error: {exc}; exiting")

    def dispatch(self, frames: list[tuple[int, int, bytes]]) -> None:
        for kind, channel, payload in frames:
            if kind == protocol.CALL:
                if channel in self.channels:
                    raise protocol.ProtocolError(f"CALL on open channel {channel}")
                self.call(channel, payload)
                continue
            target = self.channels.get(channel)
            if kind == protocol.IN:
                if target is not None:
                    target.on_in(payload)
            elif kind == protocol.EOF:
                if target is not None:
                    target.on_eof()
            elif kind == protocol.CREDIT:
                amount = protocol.decode_credit(payload)
                if target is not None:
                    target.on_credit(amount)
            elif kind == protocol.CLOSE:
                if target is not None:
                    del self.channels[channel]
                    target.on_close()
            else:
                raise protocol.ProtocolError(f"the host sent a {protocol.KIND_NAMES[kind]} frame")

    def call(self, channel: int, payload: bytes) -> None:
        try:
            try:
                args = protocol.decode_json(payload)
            except ValueError as exc:
                raise Refusal("invalid_argument", f"CALL payload is not JSON: {exc}") from None
            if not isinstance(args, dict):
                raise Refusal("invalid_argument", "CALL payload must be a JSON object")
            op = args.get("op")
            handler = self.ops.get(op) if isinstance(op, str) else None
            if handler is None:
                known = ", ".join(sorted(self.ops))
                raise Refusal(
                    "unsupported",
                    f"unknown op {op!r}: this agent (protocol {protocol.VERSION}) knows {known}",
                    unknown_op=str(op),
                )
            handler(channel, args)
        except Refusal as refusal:
            self.reply_error(channel, refusal)
        except OSError as exc:
            self.reply_error(channel, refusal_from_os_error(exc))
        except (ValueError, TypeError) as exc:
            self.reply_error(channel, Refusal("invalid_argument", str(exc)))
        except Exception as exc:
            import traceback

            traceback.print_exc()
            self.reply_error(channel, Refusal("internal", f"the agent failed: {exc!r}"))

    # -- frames out -------------------------------------------------------------------

    def send(self, kind: int, channel: int, payload: bytes = b"") -> None:
        self.out += protocol.encode_header(kind, channel, len(payload))
        self.out += payload

    def send_json(self, kind: int, channel: int, value: Any) -> None:
        self.send(kind, channel, protocol.encode_json(value))

    def reply(self, channel: int, value: Args) -> None:
        self.channels.pop(channel, None)
        payload = protocol.encode_json(value)
        if len(payload) > protocol.MAX_PAYLOAD:
            refusal = Refusal("internal", f"the reply was {len(payload)} bytes, too big to send")
            self.reply_error(channel, refusal)
            return
        self.send(protocol.REPLY, channel, payload)

    def reply_error(self, channel: int, refusal: Refusal) -> None:
        error = {"type": refusal.kind, "message": str(refusal)}
        if refusal.unknown_op is not None:  # the host is newer than this agent
            error["unknown_op"] = refusal.unknown_op
        self.reply(channel, {"ok": False, "error": error})

    def grant(self, channel: int, amount: int) -> None:
        if amount:
            self.send(protocol.CREDIT, channel, protocol.encode_credit(amount))

    def flush(self, fd: int = -1, events: int = 0) -> None:
        out = self.out
        try:
            while out:
                del out[: os.write(self.wfd, out)]
        except BlockingIOError:
            if self.wfd not in self.handlers:
                self.watch(self.wfd, EPOLLOUT, self.flush)
            return
        except OSError:
            out.clear()
            self.stop(0)
        self.unwatch(self.wfd)

    def stop(self, code: int, message: str | None = None) -> None:
        if message:
            os.write(2, f"corral-agent: {message}\n".encode())
        if self.exit_code is None:
            self.exit_code = code

    # -- arguments --------------------------------------------------------------------

    def path(self, args: Args, key: str = "path") -> str:
        value = args.get(key)
        if not isinstance(value, str) or not value:
            raise Refusal("invalid_argument", f"{key} must be a non-empty string")
        if "\0" in value:
            raise Refusal("invalid_argument", f"{key} {value!r} contains a NUL byte")
        return os.path.normpath(os.path.join(self.workdir, value))

    def user(self) -> str:
        if self.user_name is None:
            import pwd

            try:
                self.user_name = pwd.getpwuid(os.getuid()).pw_name
            except KeyError:
                self.user_name = str(os.getuid())
        return self.user_name

    # -- ops: processes ---------------------------------------------------------------

    def op_ping(self, channel: int, args: Args) -> None:
        self.reply(
            channel,
            {
                "ok": True,
                "version": protocol.VERSION,
                "pid": os.getpid(),
                "uid": os.getuid(),
                "user": self.user(),
                "workdir": self.workdir,
            },
        )

    def op_exec(self, channel: int, args: Args) -> None:
        argv, cmd = args.get("argv"), args.get("cmd")
        if (argv is None) == (cmd is None):
            raise Refusal("invalid_argument", "exec needs exactly one of argv and cmd")
        if cmd is not None:
            if not isinstance(cmd, str):
                raise Refusal("invalid_argument", "cmd must be a string")
            argv = ["/bin/sh", "-c", cmd]
        elif not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise Refusal("invalid_argument", "argv must be a non-empty list of strings")
        _check_number(args, "timeout", float)
        _check_number(args, "output_limit", int)
        tag = args.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise Refusal("invalid_argument", "tag must be a string")
        user = args.get("user")
        if user is not None and user not in (self.user(), os.getuid(), str(os.getuid())):
            raise Refusal(
                "invalid_argument",
                f"user {user} does not exist in this sandbox; only {self.user()!r} is available",
            )
        cwd = self.workdir if args.get("cwd") is None else self.path(args, "cwd")
        if not os.path.isdir(cwd):
            if os.path.exists(cwd):
                raise Refusal("not_a_directory", f"working directory {cwd} is not a directory")
            raise Refusal(
                "not_found",
                f"working directory {cwd} does not exist in the sandbox; "
                "create it first or pass an existing cwd",
            )
        env = self.base_env
        if args.get("env"):
            env = dict(env)
            for key, value in args["env"].items():
                if value is None:
                    env.pop(key, None)
                elif isinstance(value, str):
                    env[key] = value
                else:
                    raise Refusal("invalid_argument", f"env value of {key} must be a string")
        program = find_program(argv[0], env.get("PATH", DEFAULT_PATH), cwd)
        if isinstance(program, int):
            self.not_started(channel, argv[0], program)
            return
        pid, pipes, stdin_fd = self.spawn(program, argv, env, cwd, bool(args.get("stdin")))
        if pid < 0:
            self.not_started(channel, argv[0], -pid)
            return
        command = Command(self, channel, pid, args, pipes)
        command.stdin_fd = stdin_fd
        self.commands[pid] = command
        self.channels[channel] = command
        command.start()

    def spawn(
        self, program: str, argv: list[str], env: dict[str, str], cwd: str, stdin: bool
    ) -> tuple[int, dict[int, int], int | None]:
        """posix_spawn a command in its own session; pid < 0 is -(exit code) of a failure."""
        os.chdir(cwd)  # posix_spawn has no chdir action; the agent's own cwd does not matter
        self.oom.raise_for_spawn()
        try:
            return self.spawn_inheriting_score(program, argv, env, stdin)
        finally:
            self.oom.restore()

    def spawn_inheriting_score(
        self, program: str, argv: list[str], env: dict[str, str], stdin: bool
    ) -> tuple[int, dict[int, int], int | None]:
        """`spawn` while the agent holds the command's oom_score_adj."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if stdin else (None, None)
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2),
            (os.POSIX_SPAWN_DUP2, in_r, 0)
            if in_r is not None
            else (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        ]
        try:
            pid = os.posix_spawn(
                program,
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),  # Python ignores both
            )
        except OSError as exc:
            for fd in (out_r, out_w, err_r, err_w, in_r, in_w):
                if fd is not None:
                    os.close(fd)
            if exc.errno == errno.ENOENT:
                return -127, {}, None
            if exc.errno in (errno.EACCES, errno.ENOEXEC, errno.EISDIR, errno.EPERM):
                return -126, {}, None
            reason = exc.strerror or str(exc)
            raise Refusal("internal", f"could not start {argv[0]}: {reason}") from None
        for fd in (out_w, err_w, in_r):
            if fd is not None:
                os.close(fd)
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        if in_w is not None:
            os.set_blocking(in_w, False)
        return pid, {out_r: protocol.OUT, err_r: protocol.ERR}, in_w

    def not_started(self, channel: int, name: str, code: int) -> None:
        """Report a missing or unexecutable program the way a shell would."""
        what = "command not found" if code == 127 else "command not executable"
        error = f"{what}: {name}"
        self.send_json(protocol.EVENT, channel, {"pid": None})
        self.send(protocol.ERR, channel, f"corral: {error}\n".encode())
        result = {"ok": True, "exit_code": code, "signal": None, "reason": "exited"}
        self.reply(channel, {**result, "output_bytes": 0, "error": error})

    def running_command(self, args: Args) -> Command:
        pid = args.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise Refusal("invalid_argument", "pid must be an integer")
        command = self.commands.get(pid)
        if command is None or not command.running:
            raise Refusal(
                "not_running",
                f"process {pid} is not running: it exited, or this sandbox's agent did not "
                "start it; list running processes with ps",
            )
        return command

    def op_attach(self, channel: int, args: Args) -> None:
        command = self.running_command(args)
        if command.attached:
            raise Refusal(
                "invalid_argument",
                f"process {command.pid} is already attached on another channel; detach it first",
            )
        self.channels[channel] = command
        command.attach(channel)

    def op_signal(self, channel: int, args: Args) -> None:
        command = self.running_command(args)
        signum = args.get("signal")
        if not isinstance(signum, int) or not 0 < signum < 65:
            raise Refusal("invalid_argument", f"signal must be a number 1..64, not {signum!r}")
        try:
            if args.get("group"):
                os.killpg(command.pid, signum)
            else:
                os.kill(command.pid, signum)
        except ProcessLookupError:
            raise Refusal("not_running", f"process {command.pid} is not running") from None
        self.reply(channel, {"ok": True})

    def op_ps(self, channel: int, args: Args) -> None:
        running = [c.describe() for c in self.commands.values() if c.running]
        self.reply(channel, {"ok": True, "processes": running})

    # -- ops: files -------------------------------------------------------------------

    def op_read(self, channel: int, args: Args) -> None:
        path = self.path(args)
        offset = args.get("offset") or 0
        length = args.get("length")
        if not isinstance(offset, int) or offset < 0:
            raise Refusal("invalid_argument", "offset must be a non-negative integer")
        if length is not None and (not isinstance(length, int) or length < 0):
            raise Refusal("invalid_argument", "length must be a non-negative integer or null")
        fd, st = open_regular(path, os.O_RDONLY)
        info = {"size": st.st_size, "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime}
        self.send_json(protocol.EVENT, channel, info)
        download = FileDownload(self, channel, fd, offset, length)
        self.channels[channel] = download
        self.downloads.append(download)

    def op_write(self, channel: int, args: Args) -> None:
        path = self.path(args)
        mode = args.get("mode", 0o644)
        if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
            raise Refusal("invalid_argument", f"mode must be an integer 0..0o7777, not {mode!r}")
        if args.get("make_parents", True):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.isdir(path):
            raise Refusal("is_a_directory", f"{path} is a directory; write to a file path")
        upload = FileUpload(self, channel, path, mode, bool(args.get("append")))
        self.channels[channel] = upload

    def op_list(self, channel: int, args: Args) -> None:
        top = self.path(args)
        depth = args.get("depth", 1)
        if not isinstance(depth, int) or depth < 1:
            raise Refusal("invalid_argument", f"depth must be an integer >= 1, not {depth!r}")
        entries: list[Args] = []
        count = 0
        pending = [(top, depth)]  # breadth first; each directory sorted by name
        for directory, levels in pending:
            try:
                with os.scandir(directory) as scan:
                    found = sorted(scan, key=lambda item: item.name)
            except OSError:
                if directory == top:
                    raise
                continue  # a subdirectory we may not read: its entry is listed, not its content
            for item in found:
                try:
                    st = item.stat(follow_symlinks=False)
                    entries.append(entry_of(os.path.join(directory, item.name), st))
                except FileNotFoundError:  # removed while we looked
                    continue
                if levels > 1 and stat.S_ISDIR(st.st_mode):
                    pending.append((item.path, levels - 1))
            count += len(found)
            if count > LIST_MAX_ENTRIES:
                raise Refusal(
                    "invalid_argument",
                    f"{top} holds more than {LIST_MAX_ENTRIES} entries at depth {depth}; "
                    "list a smaller depth or a subdirectory",
                )
            while len(entries) >= LIST_BATCH:
                self.send_json(protocol.EVENT, channel, {"entries": entries[:LIST_BATCH]})
                del entries[:LIST_BATCH]
        self.reply(channel, {"ok": True, "entries": entries})

    def op_stat(self, channel: int, args: Args) -> None:
        self.reply(channel, {"ok": True, "entry": entry_of(self.path(args))})

    def op_mkdir(self, channel: int, args: Args) -> None:
        path = self.path(args)
        try:
            os.makedirs(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise Refusal("exists", f"{path} exists and is not a directory") from None
            self.reply(channel, {"ok": True, "created": False})
            return
        self.reply(channel, {"ok": True, "created": True})

    def op_remove(self, channel: int, args: Args) -> None:
        path = self.path(args)
        if stat.S_ISDIR(os.lstat(path).st_mode):
            if args.get("recursive"):
                remove_tree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
        self.reply(channel, {"ok": True})

    def op_rename(self, channel: int, args: Args) -> None:
        src, dst = self.path(args, "src"), self.path(args, "dst")
        overwrite = bool(args.get("overwrite", True))
        if not overwrite and os.path.lexists(dst):
            raise Refusal("exists", f"{dst} already exists; pass overwrite=True to replace it")
        try:
            os.rename(src, dst)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            move = Move(self, channel, src, dst, overwrite)  # replies when it is done
            self.channels[channel] = move
            self.moves.append(move)
            return
        self.reply(channel, {"ok": True, "entry": entry_of(dst)})


def _wake(signum: int, frame: object) -> None:
    """SIGCHLD handler: the work happens when the wakeup fd makes epoll return."""


def _check_number(args: Args, key: str, kind: type) -> None:
    value = args.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise Refusal("invalid_argument", f"{key} must be a non-negative number or null")
    if kind is int and not isinstance(value, int):
        raise Refusal("invalid_argument", f"{key} must be an integer or null")


def hide_inherited_fds() -> None:
    """Mark every descriptor above stderr close-on-exec, so no command inherits one.

    posix_spawn has no close_fds; the agent's own descriptors are close-on-exec already
    (Python's default), but those it inherited from its launcher may not be.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd > 2:
            try:  # noqa: SIM105 (contextlib would slow the agent's start)
                os.set_inheritable(fd, False)
            except OSError:  # the descriptor listdir itself used
                pass


def find_program(name: str, search_path: str, cwd: str) -> str | int:
    """The file to execute for argv[0], or the shell's exit code (127, 126) if none."""
    if "/" in name:
        return os.path.join(cwd, name)
    denied = False
    for directory in search_path.split(":"):
        candidate = os.path.join(cwd, directory or ".", name)
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(candidate, os.X_OK):
            return candidate
        denied = True
    return 126 if denied else 127


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    workdir = os.getcwd()
    for i, arg in enumerate(args):
        if arg == "--workdir" and i + 1 < len(args):
            workdir = args[i + 1]
        elif arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
    except OSError as exc:
        os.write(2, f"corral-agent: cannot use workdir {workdir}: {exc}\n".encode())
        sys.exit(2)
    try:
        oom = OomScore.open()  # before _refuse_inspection: see OomScore
    except OSError as exc:
        os.write(
            2,
            f"corral-agent: cannot set oom_score_adj ({exc}), so commands would not be the "
            "OOM killer's first choice; refusing to start\n".encode(),
        )
        sys.exit(2)
    _refuse_inspection()
    sys.exit(Agent(0, 1, workdir, oom).run())


def _refuse_inspection() -> None:
    """Make the agent non-dumpable, so code in the sandbox cannot tamper with it.

    Sandbox code runs as the agent's uid; without this it could open /proc/1/mem to
    rewrite the agent, or /proc/1/fd/1 to forge frames to the host. A non-dumpable
    process's /proc entries belong to root, which the sandbox does not have. (Yama would
    also stop it, but many hosts don't enable Yama.) Children are dumpable again after
    exec, as usual. ctypes costs ~3 ms of start-up; there is no stdlib prctl.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, SUID_DUMP_DISABLE
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (ImportError, OSError) as exc:
        os.write(2, f"corral-agent: cannot make itself non-dumpable: {exc}\n".encode())


if __name__ == "__main__":
    main()
