"""Moving a live sandbox's network events from memory (its `NetworkEventLog`) to the store.

One pump per sandbox, from its start to its end: it waits for each batch the log hands
out (already rate limited, the rest counted in "suppressed" events) and appends it. When
the sandbox ends, `stop` stores what the log still holds, so the last events before the
end are kept; for a job, before the attempt's end is written, so a reader who sees the
job finished has seen every network event of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from corral._aio import stop_tasks
from corral.errors import InvalidRequest
from corral.isolation import Sandbox
from corral.network.events import NetworkEvent
from corral.states import LIVE_SANDBOX_STATES
from corral.store import Store
from corral.store.job_rows import Attempt
from corral.store.network_events import NetworkEventRow

log = logging.getLogger("corral.sandboxes")

# How often a follower re-reads the store, and how many events one read returns.
POLL_SECONDS = 0.25
PAGE_ROWS = 500


class NetworkEventPump:
    """Stores one sandbox's network events as they come; `stop` when the sandbox ends."""

    def __init__(
        self,
        store: Store,
        sandbox: Sandbox,
        *,
        attempt: Attempt | None = None,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        """`attempt`: the job attempt the sandbox runs; `on_stored` is called after each
        batch is stored (to wake the job's followers in this process at once)."""
        self._store = store
        self._sandbox = sandbox
        self._attempt = attempt
        self._on_stored = on_stored
        self._task = asyncio.create_task(self._run(), name=f"network-events-{sandbox.id}")

    async def _run(self) -> None:
        while True:
            self._append(await self._sandbox.network_events.next_batch())

    def _append(self, batch: list[NetworkEvent]) -> None:
        if not batch:
            return
        try:
            self._store.append_network_events(self._sandbox.id, batch, attempt=self._attempt)
        except Exception:  # a store that fails now may work for the next batch
            log.exception(
                "could not store network events",
                extra={"sandbox_id": self._sandbox.id, "events": len(batch)},
            )
            return
        if self._on_stored is not None:
            self._on_stored()

    async def stop(self) -> None:
        """Stop waiting and store what the sandbox recorded until now."""
        await stop_tasks(self._task)
        self._append(self._sandbox.network_events.take())


async def follow(
    store: Store,
    sandbox_id: str,
    *,
    offset: int,
    follow: bool,
    stop: asyncio.Event | None,
) -> AsyncIterator[tuple[list[NetworkEventRow], int]]:
    """Pages of a sandbox's stored events from seq `offset`, each with how many events the
    cap has deleted so far. With `follow`, until the sandbox has ended and its last
    events are sent (or `stop` is set: its reader went away)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidRequest(f"offset={offset!r} must be a whole number >= 0")
    while stop is None or not stop.is_set():
        # Read the state before the rows: a sandbox that had ended had stored its last
        # events (the pump stops before the end is recorded), and this read gets them.
        row = store.sandbox(sandbox_id)
        ended = row is None or row.state not in LIVE_SANDBOX_STATES
        rows = store.network_events(sandbox_id, offset, PAGE_ROWS)
        if rows:
            offset = rows[-1].seq + 1
            yield rows, store.network_events_dropped(sandbox_id)
            if len(rows) == PAGE_ROWS:
                continue
        if ended or not follow:
            if not rows:
                yield [], store.network_events_dropped(sandbox_id)
            return
        if stop is None:
            await asyncio.sleep(POLL_SECONDS)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_SECONDS)
