"""Starting a sandbox's launcher process without blocking the event loop.

`asyncio.create_subprocess_exec` forks in the loop's thread and then waits there until
the child has run its `preexec_fn` and exec'd: ~10 ms with a large parent, ~25 ms on a
busy machine, during which nothing else on the loop moves. Here the fork runs in a
worker thread; the pipes are then handed to the loop as streams, and the exit is awaited
through a pidfd, so waiting costs no thread either.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable, Sequence

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


async def launch(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    pass_fds: Sequence[int],
    preexec_fn: Callable[[], None],
) -> Launcher:
    """Start `argv` in a new session with piped stdio; raises OSError/SubprocessError."""
    popen = await asyncio.to_thread(
        subprocess.Popen,
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        pass_fds=tuple(pass_fds),
        preexec_fn=preexec_fn,
        start_new_session=True,
    )
    assert popen.stdin and popen.stdout and popen.stderr
    loop = asyncio.get_running_loop()
    stdout = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdout, loop=loop), popen.stdout
    )
    stderr = asyncio.StreamReader(limit=_READ_LIMIT, loop=loop)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stderr, loop=loop), popen.stderr
    )
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop),
        popen.stdin,
    )
    stdin = asyncio.StreamWriter(transport, protocol, None, loop)
    return Launcher(popen, stdin, stdout, stderr)
