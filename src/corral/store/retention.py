"""Deleting what grows without bound, by age, one short batch at a time: ended sandboxes
(with everything recorded about them), old sandbox state events, old network events of
sandboxes, old metric points. (Finished jobs: `JobStore.delete_finished_jobs`.)

Each call deletes at most `limit` rows (or sandboxes) in one transaction and says how
many went; `corral.jobs.retention` calls again, pausing between calls, while a call
deletes its limit. The rows to delete are chosen by a SELECT … LIMIT, then deleted by
their keys: portable SQL (no DELETE … LIMIT, which PostgreSQL lacks), and a transaction
never holds the write lock longer than its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from corral.states import LIVE_SANDBOX_STATES, SANDBOX_STATES
from corral.store.database import Database
from corral.store.schema import (
    e2b_sandboxes,
    metric_points,
    network_events,
    sandbox_events,
    sandboxes,
)

ENDED_SANDBOX_STATES = tuple(s for s in SANDBOX_STATES if s not in LIVE_SANDBOX_STATES)


def _delete_by_keys(
    conn: sa.Connection, table: sa.Table, keys: tuple[str, ...], rows: Sequence[Any]
) -> int:
    """Delete the rows of `table` whose key columns `keys` equal those of `rows`."""
    if not rows:
        return 0
    where = sa.and_(*(table.c[k] == sa.bindparam(f"k_{k}") for k in keys))
    conn.execute(
        table.delete().where(where),
        [{f"k_{k}": getattr(row, k) for k in keys} for row in rows],
    )
    return len(rows)


class RetentionStore(Database):
    """Batches of old rows deleted, oldest first where an index allows."""

    def delete_ended_sandboxes(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` sandboxes that ended (killed or failed) before `before`,
        with their state events, metric points, network events and E2B row; how many
        sandboxes went."""
        with self._write() as conn:
            ids = list(
                conn.execute(
                    sa.select(sandboxes.c.id)
                    .where(sandboxes.c.state.in_(ENDED_SANDBOX_STATES))
                    .where(sandboxes.c.updated_at < before)
                    .limit(limit)
                ).scalars()
            )
            if not ids:
                return 0
            # Children first (no reliance on ON DELETE CASCADE: network events have no
            # foreign key, and SQLite enforces keys only when told to).
            for table, column in (
                (network_events, network_events.c.sandbox_id),
                (sandbox_events, sandbox_events.c.sandbox_id),
                (metric_points, metric_points.c.sandbox_id),
                (e2b_sandboxes, e2b_sandboxes.c.sandbox_id),
            ):
                conn.execute(table.delete().where(column.in_(ids)))
            conn.execute(sandboxes.delete().where(sandboxes.c.id.in_(ids)))
        return len(ids)

    def delete_old_sandbox_events(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` sandbox state events recorded before `before`."""
        with self._write() as conn:
            rows = conn.execute(
                sa.select(sandbox_events.c.id).where(sandbox_events.c.at < before).limit(limit)
            ).all()
            return _delete_by_keys(conn, sandbox_events, ("id",), rows)

    def delete_old_network_events(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` network events of sandboxes recorded before `before`. A
        job's go with the job (they are part of its event stream)."""
        with self._write() as conn:
            rows = conn.execute(
                sa.select(network_events.c.sandbox_id, network_events.c.seq)
                .where(network_events.c.job_id.is_(None))
                .where(network_events.c.at < before)
                .limit(limit)
            ).all()
            return _delete_by_keys(conn, network_events, ("sandbox_id", "seq"), rows)

    def delete_old_metric_points(self, before: datetime, limit: int) -> int:
        """Delete up to `limit` metric points taken before `before`."""
        with self._write() as conn:
            rows = conn.execute(
                sa.select(
                    metric_points.c.sandbox_id, metric_points.c.resolution, metric_points.c.at
                )
                .where(metric_points.c.at < before)
                .limit(limit)
            ).all()
            return _delete_by_keys(conn, metric_points, ("sandbox_id", "resolution", "at"), rows)
