"""Sandbox rows and their state events.

Every change of state is one transaction: the row's new state and the event that
records it (when, from, to, why) commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from corral.states import LIVE_SANDBOX_STATES
from corral.store.database import Database
from corral.store.pages import decode_token, encode_token
from corral.store.schema import network_events, sandbox_events, sandboxes
from corral.store.teams import check_totals, lock_team


@dataclass(frozen=True)
class SandboxRow:
    """One sandbox as stored."""

    id: str
    team_id: str
    template: str
    isolation: str
    state: str
    state_reason: str
    metadata: dict[str, str]
    limits: dict[str, Any]
    envs: dict[str, str]
    timeout_seconds: int
    expires_at: datetime
    idle_timeout_seconds: int
    on_idle: str
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime
    owner_host: str
    owner_pid: int
    owner_start: int
    network: dict[str, Any] = field(default_factory=lambda: {"mode": "none", "allow": []})
    # Port exposure: the traffic access token, or public ports (and an empty token).
    traffic_token: str = ""
    public_ports: bool = False
    # Its volumes: [{"name", "path", "read_only"}].
    volumes: list[dict[str, Any]] = field(default_factory=list)
    # Its writable layer is a tmpfs (its writes are memory), not a disk.
    ram_disk: bool = False


@dataclass(frozen=True)
class SandboxEvent:
    """One change of a sandbox's state."""

    sandbox_id: str
    at: datetime
    from_state: str | None
    to_state: str
    reason: str


def _row(row: sa.Row[Any]) -> SandboxRow:
    return SandboxRow(**row._asdict())


class SandboxStore(Database):
    """Sandbox rows: insert under quota, change state with an event, list in pages."""

    def insert_sandbox(self, row: SandboxRow) -> None:
        """Record a new sandbox, or refuse it (QuotaExceeded) when it would take its team
        past a quota: the count and the totals are checked in the insert's transaction,
        so concurrent creates (other threads, processes, hosts) count in turn."""
        with self._write() as conn:
            team = lock_team(conn, row.team_id)
            live = conn.execute(
                sa.select(sandboxes.c.limits)
                .where(sandboxes.c.team_id == row.team_id)
                .where(sandboxes.c.state.in_(LIVE_SANDBOX_STATES))
            ).scalars()
            check_totals(team, row.limits, list(live))
            conn.execute(sandboxes.insert().values(**asdict(row)))
            conn.execute(
                sandbox_events.insert().values(
                    sandbox_id=row.id,
                    at=row.created_at,
                    from_state=None,
                    to_state=row.state,
                    reason=row.state_reason,
                )
            )

    def delete_creating_sandbox(self, sandbox_id: str) -> None:
        """Remove a sandbox refused while `creating` (it never ran); its events go with it
        (ON DELETE CASCADE; its network events, which have no foreign key, by hand)."""
        with self._write() as conn:
            conn.execute(network_events.delete().where(network_events.c.sandbox_id == sandbox_id))
            conn.execute(
                sandboxes.delete()
                .where(sandboxes.c.id == sandbox_id)
                .where(sandboxes.c.state == "creating")
            )

    def sandbox(self, sandbox_id: str) -> SandboxRow | None:
        with self._read() as conn:
            found = conn.execute(sa.select(sandboxes).where(sandboxes.c.id == sandbox_id)).first()
        return None if found is None else _row(found)

    def transition(
        self,
        sandbox_id: str,
        to_state: str,
        reason: str,
        *,
        from_states: Sequence[str],
        **changes: Any,
    ) -> SandboxRow | None:
        """Move a sandbox to `to_state` if it is in one of `from_states`, with its event.

        Returns the updated row, or None (and changes nothing) when the sandbox is
        unknown or in another state.
        """
        now = datetime.now(UTC)
        with self._write() as conn:
            current = conn.execute(
                sa.select(sandboxes.c.state)
                .where(sandboxes.c.id == sandbox_id)
                .with_for_update()  # PostgreSQL: no concurrent change between check and set
            ).scalar_one_or_none()
            if current is None or current not in from_states:
                return None
            conn.execute(
                sandboxes.update()
                .where(sandboxes.c.id == sandbox_id)
                .values(state=to_state, state_reason=reason, updated_at=now, **changes)
            )
            conn.execute(
                sandbox_events.insert().values(
                    sandbox_id=sandbox_id,
                    at=now,
                    from_state=current,
                    to_state=to_state,
                    reason=reason,
                )
            )
            found = conn.execute(sa.select(sandboxes).where(sandboxes.c.id == sandbox_id)).one()
        return _row(found)

    def update_sandbox(self, sandbox_id: str, **changes: Any) -> None:
        """Change fields that are not the state (expires_at, last_activity_at …)."""
        with self._write() as conn:
            conn.execute(
                sandboxes.update()
                .where(sandboxes.c.id == sandbox_id)
                .values(updated_at=datetime.now(UTC), **changes)
            )

    def record_activity(self, activity: Mapping[str, datetime]) -> None:
        """Save the last-activity times of many sandboxes in one transaction."""
        if not activity:
            return
        with self._write() as conn:
            conn.execute(
                sandboxes.update()
                .where(sandboxes.c.id == sa.bindparam("sid"))
                .values(last_activity_at=sa.bindparam("at")),
                [{"sid": k, "at": v} for k, v in activity.items()],
            )

    def list_sandboxes(
        self,
        team_id: str,
        *,
        states: Sequence[str],
        metadata: Mapping[str, str] | None = None,
        page_size: int = 100,
        page_token: str = "",
        newest_first: bool = False,
        created_after: datetime | None = None,
        template: str | None = None,
    ) -> tuple[list[SandboxRow], str]:
        """A page of a team's sandboxes, oldest first (or newest first), and the token of
        the next page; `created_after` is inclusive, `template` the name it was asked by."""
        created, ident = sandboxes.c.created_at, sandboxes.c.id
        query = (
            sa.select(sandboxes)
            .where(sandboxes.c.team_id == team_id)
            .where(sandboxes.c.state.in_(states))
            .order_by(*((created.desc(), ident.desc()) if newest_first else (created, ident)))
            .limit(page_size + 1)
        )
        for key, value in (metadata or {}).items():
            query = query.where(sandboxes.c.metadata[key].as_string() == value)
        if created_after is not None:
            query = query.where(created >= created_after)
        if template is not None:
            query = query.where(sandboxes.c.template == template)
        if page_token:
            at, last_id = decode_token(page_token)
            if newest_first:
                after = sa.or_(created < at, sa.and_(created == at, ident < last_id))
            else:
                after = sa.or_(created > at, sa.and_(created == at, ident > last_id))
            query = query.where(after)
        with self._read() as conn:
            rows = [_row(r) for r in conn.execute(query)]
        if len(rows) > page_size:
            rows = rows[:page_size]
            return rows, encode_token(rows[-1].created_at, rows[-1].id)
        return rows, ""

    def live_sandboxes(self) -> list[SandboxRow]:
        """Every sandbox of every team that is creating, running or paused."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(sandboxes)
                .where(sandboxes.c.state.in_(LIVE_SANDBOX_STATES))
                .order_by(sandboxes.c.created_at)
            )
            return [_row(r) for r in found]

    def events(self, sandbox_id: str) -> list[SandboxEvent]:
        """A sandbox's state changes, oldest first."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(
                    sandbox_events.c.sandbox_id,
                    sandbox_events.c.at,
                    sandbox_events.c.from_state,
                    sandbox_events.c.to_state,
                    sandbox_events.c.reason,
                )
                .where(sandbox_events.c.sandbox_id == sandbox_id)
                .order_by(sandbox_events.c.id)
            )
            return [SandboxEvent(**r._asdict()) for r in found]
