"""The live sandboxes of this process and every change that happens to them.

Public calls (`SandboxManager`) and background work (timers, metric sampling) change
states through the same few methods here, each under the sandbox's lock, each writing
the new state and its event to the store before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

from corral.errors import CorralError, InvalidRequest, SandboxNotRunning
from corral.isolation.footprint import process_start_time
from corral.sandboxes.disk_pause import DiskImage
from corral.sandboxes.live import LiveSandbox, utc
from corral.states import LIVE_SANDBOX_STATES
from corral.store import SandboxRow, Store

log = logging.getLogger("corral.sandboxes")

ORPHANED = "failed: the server that ran it stopped (its processes are gone)"
# Last-activity times reach the store at most this often (they are in memory meanwhile).
ACTIVITY_SAVE_INTERVAL = 5.0

Change = Callable[[LiveSandbox, str], Awaitable[SandboxRow | None]]
# (host name, pid, kernel start time) of a server process.
Owner = tuple[str, int, int]


def owner_identity() -> Owner:
    """This process, as recorded in the rows of the sandboxes it runs."""
    pid = os.getpid()
    return socket.gethostname(), pid, process_start_time(pid) or 0


class LiveSandboxes:
    """Sandboxes from the start of their creation to their end, by id."""

    def __init__(self, store: Store, metrics_interval: float) -> None:
        self.store = store
        self.metrics_interval = metrics_interval
        self._entries: dict[str, LiveSandbox] = {}
        self._activity_saved = time.monotonic()
        # The manager's pause to disk (it needs the engine and the layer store), for
        # the timers of a sandbox whose timer pauses keep no memory.
        self.pause_to_disk: Change | None = None
        # Lets the filesystem of a sandbox paused to disk go, when it ends.
        self.drop_disk: Callable[[DiskImage], None] | None = None

    def get(self, sandbox_id: str) -> LiveSandbox | None:
        return self._entries.get(sandbox_id)

    def add(self, entry: LiveSandbox) -> None:
        self._entries[entry.id] = entry

    def discard(self, sandbox_id: str) -> None:
        self._entries.pop(sandbox_id, None)

    def __iter__(self) -> Iterator[LiveSandbox]:
        return iter(list(self._entries.values()))

    # -- crash recovery -----------------------------------------------------------------

    def fail_orphans(
        self, owner: Owner, *, adopt: Callable[[SandboxRow], bool] | None = None
    ) -> int:
        """Mark failed the live rows whose server process is gone; leave live owners' alone,
        and those `adopt` takes on (sandboxes paused to disk, which need no process).

        `owner` is this process (see `owner_identity`): its rows are never orphans, nor
        are those of other hosts sharing the database, which only they can judge.

        The engine's reaper has removed what their sandboxes left on the host: with this
        engine a sandbox dies with its server, so nothing can be reattached.
        """
        failed = 0
        for row in self.store.live_sandboxes():
            if (row.owner_host, row.owner_pid, row.owner_start) == owner:
                continue
            if row.owner_host != owner[0]:
                continue
            if process_start_time(row.owner_pid) == row.owner_start:
                continue  # another server, alive: its sandboxes are its business
            if adopt is not None and adopt(row):
                continue
            if self.store.transition(row.id, "failed", ORPHANED, from_states=LIVE_SANDBOX_STATES):
                failed += 1
                log.warning(
                    "sandbox marked failed: its server died",
                    extra={"sandbox_id": row.id, "owner_pid": row.owner_pid},
                )
        return failed

    # -- state changes ------------------------------------------------------------------

    async def locked(
        self,
        entry: LiveSandbox,
        allowed: Sequence[str],
        verb: str,
        change: Change | None = None,
        reason: str = "",
    ) -> SandboxRow | None:
        """Check the state under the sandbox's lock and, when it allows, make the change."""
        async with entry.lock:
            if entry.state not in allowed:
                if entry.state in ("running", "paused"):
                    raise InvalidRequest(
                        f"cannot {verb} sandbox {entry.id}: it is {entry.state}"
                        + (" (resume it first)" if entry.state == "paused" else "")
                    )
                raise SandboxNotRunning(f"sandbox {entry.id} is {entry.state}")
            return None if change is None else await change(entry, reason)

    async def pause(self, entry: LiveSandbox, reason: str) -> SandboxRow | None:
        assert entry.sandbox is not None
        self.flush(entry, final=False)
        await entry.sandbox.pause()
        return self.record_paused(entry, reason)

    def record_paused(self, entry: LiveSandbox, reason: str) -> SandboxRow | None:
        """Mark a sandbox that has just stopped running (frozen or saved to disk) paused."""
        entry.state = "paused"
        entry.rings.baseline(None, 0.0)
        return self.store.transition(
            entry.id,
            "paused",
            reason,
            from_states=("running",),
            last_activity_at=utc(entry.last_activity),
        )

    async def resume(self, entry: LiveSandbox, reason: str) -> SandboxRow | None:
        assert entry.sandbox is not None
        await entry.sandbox.resume()
        entry.state = "running"
        entry.touch(time.time())
        self.baseline(entry)
        return self.store.transition(
            entry.id,
            "running",
            reason,
            from_states=("paused",),
            last_activity_at=utc(entry.last_activity),
        )

    async def end(self, entry: LiveSandbox, state: str, reason: str) -> None:
        async with entry.lock:
            await self.end_locked(entry, state, reason)

    async def end_locked(self, entry: LiveSandbox, state: str, reason: str) -> None:
        """Flush metrics, destroy the sandbox and record its end; a no-op if it has ended.
        The caller holds the sandbox's lock."""
        if entry.state not in ("running", "paused"):
            return
        entry.state = state  # from here on, `running()` refuses it
        self.flush(entry, final=True)
        if entry.sandbox is not None:
            try:
                await entry.sandbox.destroy()
            except Exception as exc:
                log.exception("could not destroy sandbox", extra={"sandbox_id": entry.id})
                state, reason = "failed", f"failed: could not destroy it: {exc}"
        if entry.disk is not None and self.drop_disk is not None:
            self.drop_disk(entry.disk)  # paused to disk: its filesystem goes with it
            entry.disk = None
        if entry.network is not None:
            await entry.network.stop()  # what it recorded up to its end
        self.discard(entry.id)
        self.store.transition(
            entry.id,
            state,
            reason,
            from_states=LIVE_SANDBOX_STATES,
            last_activity_at=utc(entry.last_activity),
        )
        log.info("sandbox ended", extra={"sandbox_id": entry.id, "reason": reason})

    # -- timers ---------------------------------------------------------------------------

    async def enforce_timers(self) -> None:
        """Kill what outlived its deadline, pause or kill what sat idle; save activity."""
        now = time.time()
        due = [entry for entry in self if entry.due(now) is not None]
        results = await asyncio.gather(*(self._expire(e) for e in due), return_exceptions=True)
        for entry, result in zip(due, results, strict=True):
            if isinstance(result, Exception):
                log.error(
                    "sandbox timer failed", extra={"sandbox_id": entry.id, "error": repr(result)}
                )
        if time.monotonic() - self._activity_saved >= ACTIVITY_SAVE_INTERVAL:
            self.save_activity()

    async def _expire(self, entry: LiveSandbox) -> None:
        """Pause or kill a sandbox whose timer fired, if it still has once the lock is ours."""
        async with entry.lock:
            due = entry.due(time.time())
            if due is None:
                return
            action, reason = due
            log.info("sandbox timer fired", extra={"sandbox_id": entry.id, "reason": reason})
            if action == "pause":
                pause: Change = self.pause
                if not entry.pause_keeps_memory and self.pause_to_disk is not None:
                    pause = self.pause_to_disk
                    reason = "paused to disk" + reason.removeprefix("paused")
                try:
                    await pause(entry, reason)
                    return
                except CorralError as exc:  # e.g. a tier without a freezer: kill instead
                    log.warning(
                        "could not pause idle sandbox",
                        extra={"sandbox_id": entry.id, "error": str(exc)},
                    )
                    why = reason.partition(": ")[2]  # "idle for 300s", "timeout"
                    reason = f"killed: {why} (could not pause: {exc})"
            await self.end_locked(entry, "killed", reason)

    def save_activity(self) -> None:
        self._activity_saved = time.monotonic()
        changed = [e for e in self if e.last_activity > e.saved_activity]
        self.store.record_activity({e.id: utc(e.last_activity) for e in changed})
        for entry in changed:
            entry.saved_activity = entry.last_activity

    # -- metrics --------------------------------------------------------------------------

    async def sample_metrics(self) -> None:
        for entry in self:
            if entry.state == "running" and entry.sandbox is not None:
                try:
                    usage = entry.sandbox.usage()
                except (CorralError, OSError) as exc:
                    log.debug(
                        "no usage for sandbox", extra={"sandbox_id": entry.id, "error": str(exc)}
                    )
                    continue
                entry.rings.sample(usage, utc(time.time()), time.monotonic())

    def baseline(self, entry: LiveSandbox) -> None:
        """Measure CPU from now on (after creation or resume)."""
        assert entry.sandbox is not None
        try:
            entry.rings.baseline(entry.sandbox.usage(), time.monotonic())
        except (CorralError, OSError):
            entry.rings.baseline(None, 0.0)

    def flush(self, entry: LiveSandbox, *, final: bool) -> None:
        """Take a last sample and write the rings' new points to the store."""
        if entry.sandbox is not None:
            with contextlib.suppress(CorralError, OSError):
                usage = entry.sandbox.usage()
                entry.rings.sample(
                    usage, utc(time.time()), time.monotonic(), min_gap=self.metrics_interval / 2
                )
        try:
            entry.rings.flush(self.store, entry.id, final=final)
        except Exception:
            log.exception("could not store metrics", extra={"sandbox_id": entry.id})
