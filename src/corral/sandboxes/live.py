"""What the manager keeps in memory for each live sandbox, and when its timers fire.

The database holds the truth about states; this holds what is needed on hot paths
without a query: the engine sandbox, the team (for tenancy checks), the environment, the
deadlines, and the last activity (updated per exec chunk, saved to the store in batches).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from corral.isolation import Sandbox
from corral.sandboxes.disk_pause import DiskImage
from corral.sandboxes.metrics import MetricRings
from corral.sandboxes.network_events import NetworkEventPump

Action = Literal["pause", "kill"]


def utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@dataclass(eq=False)
class LiveSandbox:
    """One sandbox of this process, from the start of its creation to its end."""

    id: str
    team_id: str
    envs: dict[str, str]
    rings: MetricRings
    # Wall-clock seconds (time.time()): deadlines are shown to users as datetimes.
    expires_at: float
    idle_timeout: int
    on_idle: Action
    last_activity: float
    # What the deadline does; a sandbox it paused outlives it, paused, until resumed.
    on_timeout: Action = "kill"
    # Whether a pause by its timers keeps its memory (a frozen pause) or only its
    # filesystem (a pause to disk, E2B's autoPauseMemory=false).
    pause_keeps_memory: bool = True
    # Port exposure, checked by the port proxy on every connection without a query.
    traffic_token: str = ""
    public_ports: bool = False
    state: str = "creating"
    sandbox: Sandbox | None = None
    # While it is paused to disk: its filesystem (it has no engine sandbox meanwhile).
    disk: DiskImage | None = None
    # Stores its network events while it runs (from the end of its creation).
    network: NetworkEventPump | None = None
    # The last activity written to the store.
    saved_activity: float = 0.0
    # Serializes lifecycle changes (create, pause, resume, kill) of this sandbox.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def touch(self, now: float) -> None:
        if now > self.last_activity:
            self.last_activity = now

    def due(self, now: float) -> tuple[Action, str] | None:
        """What its timers say must happen now, with the reason to record; None: nothing."""
        if self.state not in ("running", "paused"):
            return None
        if self.disk is not None:
            return None  # paused to disk, it holds no memory: kept until killed, as E2B's
        if now >= self.expires_at:
            if self.on_timeout == "pause":
                return ("pause", "paused: timeout") if self.state == "running" else None
            return "kill", "killed: timeout"
        if (
            self.state == "running"
            and self.idle_timeout > 0
            and now - self.last_activity >= self.idle_timeout
        ):
            verb = "paused" if self.on_idle == "pause" else "killed"
            return self.on_idle, f"{verb}: idle for {self.idle_timeout}s"
        return None
