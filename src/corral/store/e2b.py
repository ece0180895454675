"""E2B sandbox rows: what E2B's API said about a sandbox created through it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from corral.store.database import Database
from corral.store.schema import e2b_sandboxes, sandboxes, teams
from corral.store.teams import _TEAM_COLUMNS, Team, _team


@dataclass(frozen=True)
class E2bSandboxRow:
    sandbox_id: str
    envd_access_token: str  # "" = not secure: its envd is reached by its id
    client_id: str
    alias: str  # the template as the caller named it
    auto_pause: bool
    envs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvdTarget:
    """What an envd request needs to know of its sandbox, read in one query."""

    team: Team
    state: str
    envd_access_token: str | None  # None: the sandbox has no E2B row


class E2bStore(Database):
    """E2B sandbox rows: insert and look up (they go with their sandbox's row)."""

    def envd_target(self, sandbox_id: str) -> EnvdTarget | None:
        """The sandbox's team, state and envd token (None for an unknown sandbox): one
        query on every envd request."""
        query = (
            sa.select(*_TEAM_COLUMNS, sandboxes.c.state, e2b_sandboxes.c.envd_access_token)
            .select_from(sandboxes)
            .join(teams, teams.c.id == sandboxes.c.team_id)
            .outerjoin(e2b_sandboxes, e2b_sandboxes.c.sandbox_id == sandboxes.c.id)
            .where(sandboxes.c.id == sandbox_id)
        )
        with self._read() as conn:
            found = conn.execute(query).first()
        if found is None:
            return None
        return EnvdTarget(_team(found), found.state, found.envd_access_token)

    def insert_e2b_sandbox(self, row: E2bSandboxRow) -> None:
        with self._write() as conn:
            conn.execute(e2b_sandboxes.insert().values(**asdict(row)))

    def e2b_sandbox(self, sandbox_id: str) -> E2bSandboxRow | None:
        with self._read() as conn:
            found = conn.execute(
                sa.select(e2b_sandboxes).where(e2b_sandboxes.c.sandbox_id == sandbox_id)
            ).first()
        return None if found is None else _row(found)

    def e2b_sandboxes(self, sandbox_ids: list[str]) -> dict[str, E2bSandboxRow]:
        """The E2B rows of those sandboxes that have one, by sandbox id."""
        if not sandbox_ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(
                sa.select(e2b_sandboxes).where(e2b_sandboxes.c.sandbox_id.in_(sandbox_ids))
            ).all()
        return {row.sandbox_id: _row(row) for row in rows}


def _row(row: sa.Row[Any]) -> E2bSandboxRow:
    return E2bSandboxRow(**row._asdict())
