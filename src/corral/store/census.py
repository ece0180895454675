"""How many live sandboxes and unfinished jobs the store holds, by state: the gauges a
Prometheus scrape reads (`corral.server.metrics`). Each count is one indexed query over
the few rows that are not finished, so a scrape costs about a store call."""

from __future__ import annotations

import sqlalchemy as sa

from corral.states import JOB_FINAL_STATES, JOB_STATES, LIVE_SANDBOX_STATES
from corral.store.database import Database
from corral.store.schema import jobs, sandboxes

# The states of the job queue: a job in any other has left it.
QUEUE_STATES = tuple(state for state in JOB_STATES if state not in JOB_FINAL_STATES)


class CensusStore(Database):
    def live_sandbox_counts(self) -> dict[tuple[str, str], int]:
        """Live sandboxes (creating, running, paused) of every process on this store, by
        (state, isolation tier)."""
        query = (
            sa.select(sandboxes.c.state, sandboxes.c.isolation, sa.func.count())
            .where(sandboxes.c.state.in_(LIVE_SANDBOX_STATES))
            .group_by(sandboxes.c.state, sandboxes.c.isolation)
        )
        with self._read() as conn:
            return {(state, tier): count for state, tier, count in conn.execute(query)}

    def queue_counts(self) -> dict[str, int]:
        """Jobs in the queue (queued, running), by state; 0 for a state none is in."""
        query = (
            sa.select(jobs.c.state, sa.func.count())
            .where(jobs.c.state.in_(QUEUE_STATES))
            .group_by(jobs.c.state)
        )
        with self._read() as conn:
            counts: dict[str, int] = dict.fromkeys(QUEUE_STATES, 0)
            counts.update({state: count for state, count in conn.execute(query)})
            return counts
