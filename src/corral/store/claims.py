"""Claims and leases: workers take queued jobs under a lease, fairly between teams, as the
host fits, renew the lease by heartbeat, and lose the job when it runs out.

Claims are fair between teams: a job's priority orders only its own team's jobs, and a
free worker slot goes to the team with the fewest running jobs (of those with a job to
claim and below their `max_running_jobs`), the team whose last job started longest ago
first among equals; then to that team's highest priority, oldest job. So a team that
floods the queue, at any priority, cannot hold another team's jobs back beyond an equal
share of the workers: the next free slot goes to a team with fewer running jobs.

Claims fit the host: a worker says how much memory it has free (`room_mib`), and a slot
goes only to a job whose sandbox fits in what is left of it, so a job waiting for room
stays queued (no claim, no events, no callbacks) rather than being claimed and given back.
A team waits for room for its best job (its smaller jobs do not pass it), while teams
after it in the turn take jobs that fit. So that a big job is not starved by a stream of
smaller ones of other teams, once it has been due for `ROOM_RESERVE_SECONDS` it reserves
its memory: the claim gives the teams after it in the turn only the room beyond it, and
the host drains until it fits. (Its team, with fewer running jobs, usually comes first.)

Claims lock rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL: concurrent workers take
different jobs, and the team row is locked while its jobs are claimed, so its running
count (read after the lock) cannot pass its cap; on SQLite `BEGIN IMMEDIATE` serializes
claims instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from corral.job_lifecycle import StopReason, heartbeat_stop, on_lease_expiry, unspent
from corral.store.database import unread
from corral.store.job_rows import JobRow, JobRows, NewEvent, job_row, utcnow
from corral.store.schema import jobs, teams

# A job due this long that does not fit the worker's free memory holds its memory back
# from other teams' smaller jobs (see the module docstring): long enough that small jobs
# fill a busy host, short enough that a big one waits minutes, not forever.
ROOM_RESERVE_SECONDS = 60.0


# Claims: the statements of `claim_jobs`, for one team (a parameter, or each team row).
def _due(team_id: sa.ColumnElement[Any]) -> sa.Select[Any]:
    """The team's queued jobs that are due and ask for one of the worker's isolations."""
    return (
        sa.select(jobs)
        .where(jobs.c.team_id == team_id)
        .where(jobs.c.state == "queued")
        .where(jobs.c.run_after <= sa.bindparam("now"))
        .where(jobs.c.isolation.in_(sa.bindparam("isolations", expanding=True)))
    )


def _running(team_id: sa.ColumnElement[Any]) -> sa.Select[Any]:
    return (
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(jobs.c.team_id == team_id)
        .where(jobs.c.state == "running")
    )


_TEAM: sa.BindParameter[str] = sa.bindparam("team_id")
# Teams with a due job: cap, running count, last start. Each is one lookup in an index
# (the partial indexes of queued and of running jobs, or team_id + started_at): no scan
# of the queue. The OFFSET keeps it so on PostgreSQL: without it the planner may turn the
# EXISTS into a join that reads every queued job of every team.
_TEAMS_DUE = sa.select(
    teams.c.id,
    teams.c.max_running_jobs,
    _running(teams.c.id).scalar_subquery().label("running"),
    sa.select(sa.func.max(jobs.c.started_at))
    .where(jobs.c.team_id == teams.c.id)
    .scalar_subquery()
    .label("last_start"),
).where(_due(teams.c.id).with_only_columns(jobs.c.id).offset(0).exists())
_LOCK_TEAM = sa.select(teams.c.id).where(teams.c.id == _TEAM).with_for_update(skip_locked=True)
# The team's best `n` due jobs, locked, each with the team's running count (read by this
# statement, which starts after the team's lock is held).
_TEAM_DUE = (
    _due(_TEAM)
    .add_columns(_running(_TEAM).scalar_subquery().label("team_running"))
    .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
    .limit(sa.bindparam("n"))
    .with_for_update(skip_locked=True)
)
_NEVER = datetime.min.replace(tzinfo=UTC)


def _job(row: sa.Row[Any]) -> JobRow:
    """The job of a `_TEAM_DUE` row (without its team's count)."""
    columns = row._asdict()
    del columns["team_running"]
    return JobRow(**columns)


@dataclass
class _Turn:
    """A team in a claim: its running jobs (those claimed so far included), when its last
    job started, and its due jobs once looked up (best first)."""

    team_id: str
    cap: int
    running: int
    last_start: datetime
    due: list[JobRow] | None = None

    def order(self) -> tuple[int, datetime, str]:
        return (self.running, self.last_start, self.team_id)


@dataclass
class _Room:
    """The memory a claim may still hand out (None: no bound), and the host's capacity."""

    mib: int | None
    capacity_mib: int | None
    now: datetime

    def take(self, job: JobRow) -> bool:
        """Whether `job` fits; if so its memory is taken, else, once it has waited
        `ROOM_RESERVE_SECONDS`, reserved (so nothing smaller takes the room it waits for)."""
        if self.mib is None:
            return True
        if self.capacity_mib is not None and job.memory_mib > self.capacity_mib:
            return True  # it never fits: its worker fails it, with no sandbox
        if job.memory_mib <= self.mib:
            self.mib -= job.memory_mib
            return True
        if (self.now - job.run_after).total_seconds() >= ROOM_RESERVE_SECONDS:
            self.mib -= job.memory_mib
        return False


class JobClaims(JobRows):
    """The claim of queued jobs by a worker (fair between teams, within the host's room),
    and the leases it then holds."""

    def claim_jobs(
        self,
        worker: str,
        isolations: Sequence[str],
        limit: int,
        lease: float,
        *,
        room_mib: int | None = None,
        capacity_mib: int | None = None,
    ) -> list[JobRow]:
        """Take up to `limit` due queued jobs that ask for one of `isolations`, shared
        between teams as the module's docstring says; each becomes running under this
        worker's lease. With `room_mib`, only jobs whose memory fits in it together; a job
        above `capacity_mib` (the host's whole capacity) is taken regardless, since it
        needs no room: its worker fails it at once."""
        now = utcnow()
        with self._write() as conn:
            room = _Room(room_mib, capacity_mib, now)
            due = self._fair_share(conn, list(isolations), limit, now, room)
            if not due:
                return []
            claim: dict[str, Any] = dict(
                state="running",
                state_reason=f"running on {worker}",
                worker=worker,
                lease_expires_at=now + timedelta(seconds=lease),
                started_at=now,
                exit_code=None,
                updated_at=now,
            )
            conn.execute(
                unread(jobs.update())
                .where(jobs.c.id.in_([row.id for row in due]))
                .values(
                    attempt=jobs.c.attempt + 1,
                    next_event_seq=jobs.c.next_event_seq + 1,  # the "running" event below
                    **claim,
                )
            )
            claimed = [replace(row, attempt=row.attempt + 1, **claim) for row in due]
            for row in claimed:
                event = NewEvent("state", row.state_reason, "running", {"worker": worker})
                self._add_events(conn, row, row.attempt, [event])
        return [replace(row, next_event_seq=row.next_event_seq + 1) for row in claimed]

    def _fair_share(
        self, conn: sa.Connection, isolations: list[str], limit: int, now: datetime, room: _Room
    ) -> list[JobRow]:
        """Up to `limit` due jobs, picked one at a time: each from the team whose turn it
        is (fewest running, then served longest ago), its best job (priority, then age)
        if that fits the `room` left, else none of the team's."""
        params = {"now": now, "isolations": isolations}
        turns = [
            _Turn(r.id, r.max_running_jobs, r.running, r.last_start or _NEVER)
            for r in conn.execute(_TEAMS_DUE, params)
        ]
        picked: list[JobRow] = []
        while len(picked) < limit:
            waiting = [t for t in turns if t.running < t.cap and t.due != []]
            if not waiting:
                break
            turn = min(waiting, key=_Turn.order)
            if turn.due is None:
                turn.due = self._team_due(conn, turn, limit - len(picked), params)
                continue  # its running count was read again: choose again
            if not room.take(turn.due[0]):
                turn.due = []  # the team waits for room for its best job
                continue
            picked.append(turn.due.pop(0))
            turn.running += 1
            turn.last_start = now
        return picked

    @staticmethod
    def _team_due(
        conn: sa.Connection, turn: _Turn, room: int, params: dict[str, Any]
    ) -> list[JobRow]:
        """The team's best due jobs, as many as `room` and its cap allow, locked.

        On PostgreSQL the team row is locked first (a claimer that holds it already makes
        this one skip the team) and its running jobs are counted after the lock, so two
        claimers cannot both take its last free place. On SQLite the lock is a plain read
        and the count finds what the claim read already: its write transaction holds the
        whole database."""
        team = {"team_id": turn.team_id}
        if conn.execute(_LOCK_TEAM, team).first() is None:
            return []
        rows = conn.execute(_TEAM_DUE, {**params, **team, "n": min(room, turn.cap)}).all()
        if not rows:
            return []
        # Counted and looked up in one statement (one round trip): the jobs beyond the
        # team's cap were locked too, and are let go at the commit, unchanged.
        turn.running = rows[0].team_running
        return [_job(r) for r in rows[: max(0, turn.cap - turn.running)]]

    # -- leases -------------------------------------------------------------------------

    def next_run_after(self, isolations: Sequence[str]) -> datetime | None:
        """When the next queued job with one of `isolations` that is not yet due is."""
        with self._read() as conn:
            found: datetime | None = conn.execute(
                sa.select(sa.func.min(jobs.c.run_after))
                .where(jobs.c.state == "queued")
                .where(jobs.c.run_after > utcnow())
                .where(jobs.c.isolation.in_(list(isolations)))
            ).scalar_one()
        return found

    def heartbeat(self, worker: str, job_ids: Iterable[str], lease: float) -> dict[str, StopReason]:
        """Extend the lease of this worker's running jobs. Returns the jobs it must stop,
        with why: a cancel was asked, or the job is no longer this worker's."""
        job_ids = list(job_ids)
        if not job_ids:
            return {}
        now = utcnow()
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id.in_(job_ids))
                .where(jobs.c.worker == worker)
                .where(jobs.c.state == "running")
                .values(lease_expires_at=now + timedelta(seconds=lease))
            )
            found = {
                r.id: r
                for r in conn.execute(
                    sa.select(jobs.c.id, jobs.c.state, jobs.c.worker, jobs.c.cancel_reason).where(
                        jobs.c.id.in_(job_ids)
                    )
                )
            }
        stop: dict[str, StopReason] = {}
        for job_id in job_ids:
            r = found.get(job_id)
            if r is None:
                why: StopReason | None = "lost"  # deleted: no longer anyone's
            else:
                why = heartbeat_stop(r.state, r.worker, worker, r.cancel_reason is not None)
            if why is not None:
                stop[job_id] = why
        return stop

    def expire_worker(self, worker: str) -> None:
        """End the leases of a worker known to be dead, so `expire_leases` takes its jobs
        now rather than when the leases run out."""
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.worker == worker)
                .where(jobs.c.state == "running")
                .values(lease_expires_at=utcnow() - timedelta(seconds=1))
            )

    def running_workers(self) -> list[str]:
        """The workers that hold running jobs."""
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.select(jobs.c.worker).where(jobs.c.state == "running").distinct()
                ).scalars()
            )

    def expire_leases(self, max_lost: int) -> list[JobRow]:
        """Jobs whose worker stopped heartbeating: requeued (attempt counter kept), or
        lost when this is the `max_lost`-th worker they lost, or canceled when a cancel
        waits."""
        now = utcnow()
        changed = []
        with self._write() as conn:
            expired = [
                job_row(r)
                for r in conn.execute(
                    sa.select(jobs)
                    .where(jobs.c.state == "running")
                    .where(jobs.c.lease_expires_at < now)
                    .with_for_update(skip_locked=True)
                )
            ]
            for row in expired:
                lost = row.lost_count + 1
                move = on_lease_expiry(row.worker, row.attempt, lost, row.cancel_reason, max_lost)
                state, reason = move.state, move.reason
                changes: dict[str, Any] = dict(
                    state=state,
                    state_reason=reason,
                    lost_count=lost,
                    lease_expires_at=None,
                    updated_at=now,
                )
                if not move.final:
                    changes["run_after"] = now
                    changes["max_attempts"] = unspent(row.max_attempts)
                else:
                    changes["finished_at"] = now
                event = NewEvent("state", reason, state)
                changes["next_event_seq"] = self._add_events(conn, row, row.attempt, [event])
                self._update(conn, row.id, **changes)
                changed.append(replace(row, **changes))
        return changed
