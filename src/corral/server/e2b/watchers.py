"""envd's polling watchers (CreateWatcher, GetWatcherEvents, RemoveWatcher): watches kept
between calls, each reachable only through the sandbox (and team) that made it.

A watcher is a `GuestWatch` (inotify inside the sandbox, see `corral.guest.agent_watch`)
under a random id. Its events wait in the watch's bounded buffer until asked for; a
watcher whose sandbox ended is dropped when next touched. The same caller could fill the
server with watchers it never removes: each sandbox may hold `MAX_PER_SANDBOX`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from corral.errors import NotFound, QuotaExceeded
from corral.guest import GuestWatch

MAX_PER_SANDBOX = 64


@dataclass(frozen=True)
class Watcher:
    team_id: str
    sandbox_id: str
    watch: GuestWatch


class Watchers:
    """The live polling watchers of one server, by id."""

    def __init__(self) -> None:
        self._watchers: dict[str, Watcher] = {}

    def add(self, team_id: str, sandbox_id: str, watch: GuestWatch) -> str:
        self._forget_ended()
        held = sum(1 for w in self._watchers.values() if w.sandbox_id == sandbox_id)
        if held >= MAX_PER_SANDBOX:
            raise QuotaExceeded(
                f"sandbox {sandbox_id} has {held} watchers, the most it may hold; remove "
                "some (WatchHandle.stop) before creating more"
            )
        watcher_id = secrets.token_hex(12)
        self._watchers[watcher_id] = Watcher(team_id, sandbox_id, watch)
        return watcher_id

    def get(self, team_id: str, sandbox_id: str, watcher_id: str) -> Watcher:
        """The watcher, if this sandbox of this team made it; NotFound otherwise."""
        watcher = self._watchers.get(watcher_id)
        if watcher is None or (watcher.team_id, watcher.sandbox_id) != (team_id, sandbox_id):
            raise NotFound(
                f"no watcher {watcher_id!r} in sandbox {sandbox_id}: it was removed, its "
                "sandbox restarted, or it was never created; create a new one (watch_dir)"
            )
        return watcher

    def pop(self, team_id: str, sandbox_id: str, watcher_id: str) -> Watcher:
        watcher = self.get(team_id, sandbox_id, watcher_id)
        del self._watchers[watcher_id]
        return watcher

    def _forget_ended(self) -> None:
        for watcher_id, watcher in list(self._watchers.items()):
            if watcher.watch.ended:
                del self._watchers[watcher_id]
