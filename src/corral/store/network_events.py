"""Network events in the store: appended in batches per sandbox, read after a cursor,
capped per sandbox.

Each sandbox's rows are numbered from 0 with no gaps (`seq`); past
`Settings.network_events_max` rows the oldest are deleted, so the count of rows a
sandbox lost to the cap is the seq of its first row kept. A job's sandbox also writes
the job's id and, while its attempt holds the lease, a `job_seq` taken from the job's
event numbers: the job's event stream shows the row in order with its other events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from corral.network.events import NetworkEvent, describe
from corral.store.job_rows import Attempt, JobEventRow, JobRows
from corral.store.schema import network_events

_INSERT = network_events.insert()
_NEXT_SEQ = sa.select(sa.func.coalesce(sa.func.max(network_events.c.seq) + 1, 0)).where(
    network_events.c.sandbox_id == sa.bindparam("sandbox_id")
)
_TRIM = (
    network_events.delete()
    .where(network_events.c.sandbox_id == sa.bindparam("sandbox_id"))
    .where(network_events.c.seq < sa.bindparam("below"))
)


@dataclass(frozen=True)
class NetworkEventRow:
    """One stored network event of a sandbox."""

    sandbox_id: str
    seq: int
    job_id: str | None
    job_seq: int | None
    attempt: int
    at: datetime
    kind: str
    decision: str
    rule: str
    protocol: str
    address: str
    port: int
    name: str
    answers: tuple[str, ...] = field(default=())
    count: int = 1

    def fields(self) -> dict[str, Any]:
        """What the event says, as a job event's `data` (and the CLI's JSON)."""
        return {
            "kind": self.kind,
            "decision": self.decision,
            "rule": self.rule,
            "protocol": self.protocol,
            "address": self.address,
            "port": self.port,
            "name": self.name,
            "answers": list(self.answers),
            "count": self.count,
        }

    def job_event(self) -> JobEventRow:
        """This row as an event of its job's stream (type "network")."""
        assert self.job_id is not None and self.job_seq is not None
        return JobEventRow(
            job_id=self.job_id,
            seq=self.job_seq,
            at=self.at,
            attempt=self.attempt,
            type="network",
            state=None,
            reason=describe(self),
            data=self.fields(),
        )


def _row(found: sa.Row[Any]) -> NetworkEventRow:
    values = found._asdict()
    values["answers"] = tuple(values["answers"])
    return NetworkEventRow(**values)


class NetworkEventStore(JobRows):
    """A sandbox's network events: append (capped), read from a cursor."""

    def append_network_events(
        self,
        sandbox_id: str,
        events: Sequence[NetworkEvent],
        *,
        attempt: Attempt | None = None,
    ) -> int:
        """Store `events` after the sandbox's last ones, in one transaction, and delete
        its oldest beyond `settings.network_events_max`; how many that deleted.

        With `attempt` (a job's sandbox) the rows name the job, and while the attempt
        still holds the job's lease they also take the job's next event seqs."""
        if not events:
            return 0
        with self._write() as conn:
            seq = conn.execute(_NEXT_SEQ, {"sandbox_id": sandbox_id}).scalar_one()
            job_id, job_seq, attempt_no = None, None, 0
            job = None
            if attempt is not None:
                job_id, attempt_no = attempt.job_id, attempt.attempt
                job = self._owned(conn, attempt)
                if job is not None:
                    job_seq = job.next_event_seq
            values = []
            for event in events:
                values.append(
                    {
                        "sandbox_id": sandbox_id,
                        "seq": seq,
                        "job_id": job_id,
                        "job_seq": job_seq,
                        "attempt": attempt_no,
                        "at": datetime.fromtimestamp(event.at, UTC),
                        "kind": event.kind,
                        "decision": event.decision,
                        "rule": event.rule,
                        "protocol": event.protocol,
                        "address": event.address,
                        "port": event.port,
                        "name": event.name,
                        "answers": list(event.answers),
                        "count": event.count,
                    }
                )
                seq += 1
                if job_seq is not None:
                    job_seq += 1
            conn.execute(_INSERT, values)
            if job is not None:
                self._update(conn, job.id, next_event_seq=job_seq)
            keep = self.settings.network_events_max
            if seq <= keep:
                return 0
            return conn.execute(_TRIM, {"sandbox_id": sandbox_id, "below": seq - keep}).rowcount

    def network_events(
        self, sandbox_id: str, offset: int = 0, limit: int = 1000
    ) -> list[NetworkEventRow]:
        """A sandbox's events from seq `offset`, in order, at most `limit`."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(network_events)
                .where(network_events.c.sandbox_id == sandbox_id)
                .where(network_events.c.seq >= offset)
                .order_by(network_events.c.seq)
                .limit(limit)
            )
            return [_row(r) for r in found]

    def network_events_dropped(self, sandbox_id: str) -> int:
        """How many of the sandbox's events the per-sandbox cap deleted: seqs start at 0
        with no gaps, so it is the seq of the first one kept."""
        with self._read() as conn:
            first = conn.execute(
                sa.select(sa.func.min(network_events.c.seq)).where(
                    network_events.c.sandbox_id == sandbox_id
                )
            ).scalar_one()
        return int(first or 0)

    def job_network_events(self, job_id: str, offset: int, limit: int) -> list[JobEventRow]:
        """A job's network events from job event seq `offset`, as job events."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(network_events)
                .where(network_events.c.job_id == job_id)
                .where(network_events.c.job_seq >= offset)
                .order_by(network_events.c.job_seq)
                .limit(limit)
            )
            return [_row(r).job_event() for r in found]
