"""The processes E2B clients started, each followed by any number of streams.

envd keeps a process running when the stream that started it goes away, and lets any
number of `Connect` streams follow it at once (E2B's SDK relies on both: a background
command's handle and `commands.connect(pid)` read the same process; a PTY is dropped and
re-connected). The engine gives one stream per process, so a `Followed` process has one
pump task that reads the engine's stream (started as a background command, so it stays
attached for stdin and signals for as long as it runs) and hands each event to every
stream following it. Output nobody follows is dropped, as envd does; a follower that
stops reading holds the pump (and so the process's output) back after `QUEUE_EVENTS`
events, as Corral's engine does: nothing buffers without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from corral.errors import GuestError, SandboxNotRunning
from corral.guest import ExecResult
from corral.sandboxes.commands import ExecEvent, Started

# Events (chunks of at most the agent's CHUNK bytes) a follower may be behind by.
QUEUE_EVENTS = 64


@dataclass(frozen=True)
class Broken:
    """The process's stream broke (its sandbox was killed or its agent died)."""

    error: Exception


Item = ExecEvent | Broken


@dataclass(frozen=True)
class Launch:
    """How a process was started through E2B, as `List` reports it."""

    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None
    pty: bool
    stdin: bool


class Follower:
    """One stream's view of a followed process: the events after it began following."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE_EVENTS)
        self.gone = False

    async def next(self) -> Item:
        return await self._queue.get()

    async def put(self, item: Item) -> None:
        if not self.gone:
            await self._queue.put(item)

    def leave(self) -> None:
        """Stop following; a pump waiting for room in this follower's queue goes on."""
        self.gone = True
        while not self._queue.empty():
            self._queue.get_nowait()


@dataclass
class Followed:
    """A running process of a sandbox and the streams following it."""

    sandbox_id: str
    pid: int
    launch: Launch | None  # None: started outside E2B (Corral's API), attached later
    followers: set[Follower] = field(default_factory=set)

    def follow(self) -> Follower:
        follower = Follower()
        self.followers.add(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        self.followers.discard(follower)
        follower.leave()

    async def publish(self, item: Item) -> None:
        for follower in list(self.followers):
            await follower.put(item)


class ProcessHub:
    """Every followed process of a server's sandboxes, by (sandbox, pid)."""

    def __init__(self) -> None:
        self._processes: dict[tuple[str, int], Followed] = {}
        self._pumps: set[asyncio.Task[None]] = set()

    def find(self, sandbox_id: str, pid: int) -> Followed | None:
        return self._processes.get((sandbox_id, pid))

    def launches(self, sandbox_id: str) -> dict[int, Launch]:
        return {
            pid: followed.launch
            for (box, pid), followed in self._processes.items()
            if box == sandbox_id and followed.launch is not None
        }

    def adopt(
        self,
        sandbox_id: str,
        started: Started,
        events: AsyncGenerator[ExecEvent],
        launch: Launch | None,
        sandbox_gone: Callable[[], Awaitable[bool]],
    ) -> tuple[Followed, Follower]:
        """Follow the process whose stream `events` just gave `started`; the caller is
        its first follower (registered before any output is read, so it misses none).
        `sandbox_gone` tells a kill of the process from the end of its sandbox."""
        followed = Followed(sandbox_id, started.pid, launch)
        follower = followed.follow()
        self._processes[(sandbox_id, started.pid)] = followed
        pump = asyncio.create_task(
            self._pump(followed, events, sandbox_gone), name="corral-e2b-process"
        )
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)
        return followed, follower

    async def _pump(
        self,
        followed: Followed,
        events: AsyncGenerator[ExecEvent],
        sandbox_gone: Callable[[], Awaitable[bool]],
    ) -> None:
        last: Item
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, ExecResult):
                        # The engine ends a killed sandbox's commands as "killed"; for
                        # E2B that is the connection breaking, not the process's end.
                        if event.reason == "killed" and await sandbox_gone():
                            last = Broken(SandboxNotRunning(event.error or "sandbox ended"))
                        else:
                            last = event
                        break
                    await followed.publish(event)
                else:
                    last = Broken(GuestError(f"process {followed.pid}'s stream ended early"))
        except Exception as exc:  # the sandbox died under it, or its agent broke
            last = Broken(exc)
        finally:
            # Forgotten before the last event goes out: a Connect from now on finds no
            # process (NOT_FOUND) rather than following one that will never speak again.
            key = (followed.sandbox_id, followed.pid)
            if self._processes.get(key) is followed:
                del self._processes[key]
        await followed.publish(last)
