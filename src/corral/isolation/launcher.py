"""Starting a sandbox's launcher process, cheaply and confined from its first instruction.

Forking the server (a large process) costs milliseconds with the GIL held, and a
`preexec_fn` forces a real fork. So the launcher is spawned with vfork (no preexec, no
uid change in the child) as a tiny POSIX shell that waits at a gate — a line on its
stdin — while the host moves it into the sandbox's cgroup; only then does it set its
rlimits and exec the launcher proper, through `setpriv` to drop to the sandbox's host
uid when there is one. Everything the launcher ever starts is thus in the cgroup. Its
exit is awaited through a pidfd, so waiting costs no thread either.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Sequence

# $1: open files, $2: file size in 512-byte blocks (POSIX ulimit units), then the argv.
_GATE = (
    'read -r _ || exit 125; ulimit -n "$1" && ulimit -f "$2" && ulimit -c 0 && shift 2 && exec "$@"'
)
# The guest protocol's frames are at most a few hundred KiB; the reader's buffer limit
# must exceed the largest line-less read (asyncio's default, 64 KiB, is per readline).
_READ_LIMIT = 1 << 20


class Launcher:
    """A started child process with asyncio streams on its stdin, stdout and stderr."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: asyncio.StreamWriter,
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def children(self) -> list[int]:
        """The launcher's child processes (for bubblewrap: the pid namespace's init)."""
        return children(self.pid)

    def kill_tree(self) -> None:
        """SIGKILL the launcher's children, or the launcher itself while it has none.

        Killing the child first lets the launcher, still alive, reap it; killing the
        launcher first would orphan the child to the host's pid 1, which on some hosts
        never reaps, leaving zombies.
        """
        targets = self.children() or ([self.pid] if self.returncode is None else [])
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def wait(self) -> int:
        """The exit status, once the process has exited (and been reaped)."""
        code = self._popen.poll()
        if code is not None:
            return code
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(self.pid)
        try:
            exited: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(fd, readable)
            try:
                await exited
            finally:
                loop.remove_reader(fd)
        finally:
            os.close(fd)
        return self._popen.wait()


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def data_fd(name: str, data: bytes) -> int:
    """A sealed, close-on-exec memory file holding `data`, positioned at its start: for
    handing data to a launcher through `pass_fds` (the caller closes it)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE,
        )
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsize_blocks() -> str:
    """This process's RLIMIT_FSIZE in `ulimit -f` units (512-byte blocks)."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft // 512)


def _join(pid: int, cgroup_procs: Sequence[str]) -> None:
    for path in cgroup_procs:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)


@functools.cache
def setpriv() -> str | None:
    """util-linux's setpriv, which drops to the sandbox's host uid before exec."""
    return shutil.which("setpriv")


@functools.cache
def nsenter() -> str:
    """util-linux's nsenter, which joins a sandbox's network namespace before exec."""
    return shutil.which("nsenter") or "nsenter"


async def launch(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    pass_fds: Sequence[int],
    cgroup_procs: Sequence[str],
    open_files: int | None,
    file_size: int | None,
    uid: int | None,
    gid: int | None,
    netns: str | None = None,
    userns: str | None = None,
    ready: Awaitable[None] | None = None,
) -> Launcher:
    """Start `argv` in a new session with piped stdio, joined to the cgroup whose procs
    files are `cgroup_procs`, with rlimits on open files and file size (bytes) and no
    core dumps, as `uid`/`gid` (no supplementary groups) when given, in the network
    namespace bind-mounted at `netns` when given (joined before the uid is dropped; with
    `userns`, the user namespace that owns it, joined first, as its root). The gate opens
    once `ready` (the network namespace being made meanwhile) is done.

    Both rlimits None: the launcher keeps this process's (a tier whose guest is not a
    host process, like gVisor's, holds the guest to them itself).

    Raises OSError/SubprocessError.
    """
    if open_files is None or file_size is None:  # the tier holds its guest to them
        nofile, fsize = resource.getrlimit(resource.RLIMIT_NOFILE)[0], _fsize_blocks()
    else:
        nofile, fsize = open_files, str(file_size // 512)
    command = ["/bin/sh", "-c", _GATE, "corral-launch", str(nofile), fsize]
    if userns is not None:  # rootless: the owner of `netns` first, as its root
        command += [nsenter(), f"--user={userns}", f"--net={netns}", "--preserve-credentials"]
        command += ["--"]
    elif netns is not None:
        command += [nsenter(), f"--net={netns}", "--"]
    if uid is not None or gid is not None:
        tool = setpriv()
        if tool is None:
            raise OSError("setpriv is missing: apt-get install util-linux")
        command += [tool, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    popen = subprocess.Popen(
        command + list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        start_new_session=True,
    )
    assert popen.stdin and popen.stdout and popen.stderr
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    try:
        # In a thread: on cgroup v1 the kernel may wait a whole RCU grace period (~10 ms)
        # before a process can move, and the event loop has better things to do.
        await asyncio.to_thread(_join, popen.pid, cgroup_procs)
        if ready is not None:
            await ready
        popen.stdin.write(b"\n")  # open the gate: the pipe is empty, this never blocks
        popen.stdin.flush()
        # Still inside the try: a cancel (a job cancelled while its sandbox starts) may
        # land on any of these awaits, and must not leave the launcher running unowned.
        stdout = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout, loop=loop), popen.stdout
        )
        transports.append(transport)
        stderr = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stderr, loop=loop), popen.stderr
        )
        transports.append(transport)
        writer, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop),
            popen.stdin,
        )
        transports.append(writer)
    except BaseException:
        popen.kill()
        popen.wait()
        for made in transports:
            made.close()
        for pipe in (popen.stdin, popen.stdout, popen.stderr):
            pipe.close()
        raise
    stdin = asyncio.StreamWriter(writer, protocol, None, loop)
    return Launcher(popen, stdin, stdout, stderr)
