"""Template rows (one per build of a team's template name) and the build step cache.

A name's sandboxes start from its newest `ready` row. A build adds a `building` row; when
it is ready, the older rows of the name go in the same transaction (the caller releases
their layers), so a rebuild replaces the template at once and the old one served until
then. A failed or cancelled build leaves its row (its error is shown) until the next
build of the name, or its deletion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from corral.errors import QuotaExceeded
from corral.states import LIVE_SANDBOX_STATES
from corral.store.database import Database
from corral.store.schema import build_cache, sandboxes, templates
from corral.store.teams import lock_team

TEMPLATE_STATES = ("building", "ready", "failed", "cancelled")


@dataclass(frozen=True)
class TemplateRow:
    """One build of a team's template, as stored."""

    id: str
    team_id: str
    name: str
    state: str
    source: str
    layers: list[str]
    env: dict[str, str]
    workdir: str | None
    user: str
    start_cmd: str | None
    ready_cmd: str | None
    size_bytes: int
    build_job_id: str | None
    steps_total: int
    steps_cached: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    request: dict[str, Any] = field(default_factory=dict)
    # Its sandboxes' defaults (corral.templates.defaults.SandboxDefaults as JSON).
    sandbox_limits: dict[str, int | float] = field(default_factory=dict)
    sandbox_network: dict[str, Any] | None = None


def _row(row: sa.Row[Any]) -> TemplateRow:
    return TemplateRow(**row._asdict())


def _newest_first(query: sa.Select[Any]) -> sa.Select[Any]:
    return query.order_by(templates.c.created_at.desc(), templates.c.id.desc())


def _check_quota(
    conn: sa.Connection, team_id: str, name: str, max_count: int, max_bytes: int, adding: int
) -> None:
    """Refuse (QuotaExceeded) a team's template `name` of `adding` bytes when its names
    would number more than `max_count`, or its ready templates hold more than `max_bytes`
    (a rebuild's bytes count in place of the row it replaces)."""
    names = set(
        conn.execute(
            sa.select(templates.c.name).where(templates.c.team_id == team_id).distinct()
        ).scalars()
    )
    if name not in names and len(names) >= max_count:
        raise QuotaExceeded(
            f"the team has {len(names)} templates, its quota is {max_count} "
            "(CORRAL_TEMPLATE_MAX_COUNT): delete one with `corral template rm NAME`, or ask "
            "an admin to raise the quota"
        )
    held = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(templates.c.size_bytes), 0))
        .where(templates.c.team_id == team_id)
        .where(templates.c.state == "ready")
        .where(templates.c.name != name)
    ).scalar_one()
    if int(held) + adding > max_bytes:
        raise QuotaExceeded(
            f"the team's templates would hold {int(held) + adding} bytes, its quota is "
            f"{max_bytes} (CORRAL_TEMPLATE_MAX_BYTES): delete templates, or ask an admin "
            "to raise the quota"
        )


class TemplateStore(Database):
    """Template rows under per-team quotas, and the build step cache."""

    def insert_template(self, row: TemplateRow, *, max_count: int, max_bytes: int) -> None:
        """Record a new build (a `building` row) unless it takes its team past a quota;
        checked in the insert's transaction, so concurrent builds count in turn."""
        with self._write() as conn:
            lock_team(conn, row.team_id)
            _check_quota(conn, row.team_id, row.name, max_count, max_bytes, row.size_bytes)
            conn.execute(templates.insert().values(**asdict(row)))

    def template(self, template_id: str) -> TemplateRow | None:
        with self._read() as conn:
            found = conn.execute(sa.select(templates).where(templates.c.id == template_id)).first()
        return None if found is None else _row(found)

    def template_by_job(self, job_id: str) -> TemplateRow | None:
        with self._read() as conn:
            found = conn.execute(
                sa.select(templates).where(templates.c.build_job_id == job_id)
            ).first()
        return None if found is None else _row(found)

    def template_rows(self, team_id: str, name: str | None = None) -> list[TemplateRow]:
        """The team's rows (of `name`, or all), newest first."""
        query = sa.select(templates).where(templates.c.team_id == team_id)
        if name is not None:
            query = query.where(templates.c.name == name)
        with self._read() as conn:
            return [_row(r) for r in conn.execute(_newest_first(query))]

    def ready_templates(self) -> list[TemplateRow]:
        """Every ready row of every team, newest first (what a starting server registers)."""
        query = sa.select(templates).where(templates.c.state == "ready")
        with self._read() as conn:
            return [_row(r) for r in conn.execute(_newest_first(query))]

    def template_layers(self) -> set[str]:
        """Every layer digest a template row (any state) names."""
        with self._read() as conn:
            return {
                d
                for layers in conn.execute(sa.select(templates.c.layers)).scalars()
                for d in layers
            }

    def update_template(self, template_id: str, **changes: Any) -> TemplateRow | None:
        """Change a row that is still `building`; None (nothing changed) once it is not."""
        with self._write() as conn:
            done = conn.execute(
                templates.update()
                .where(templates.c.id == template_id)
                .where(templates.c.state == "building")
                .values(updated_at=datetime.now(UTC), **changes)
            )
            if done.rowcount == 0:
                return None
            found = conn.execute(sa.select(templates).where(templates.c.id == template_id)).one()
        return _row(found)

    def finish_template(
        self,
        template_id: str,
        state: str,
        *,
        max_count: int,
        max_bytes: int,
        **changes: Any,
    ) -> tuple[TemplateRow | None, list[TemplateRow]]:
        """End a `building` row in `state` (with `changes`); a `ready` one replaces the
        older rows of its name, which are deleted and returned. (None, []) when the row
        is no longer building (cancelled or deleted meanwhile). A ready row past the
        team's byte quota raises QuotaExceeded and changes nothing."""
        now = datetime.now(UTC)
        with self._write() as conn:
            current = conn.execute(
                sa.select(templates).where(templates.c.id == template_id).with_for_update()
            ).first()
            if current is None or current.state != "building":
                return None, []
            old: list[TemplateRow] = []
            if state == "ready":
                lock_team(conn, current.team_id)
                size = int(changes.get("size_bytes", current.size_bytes))
                _check_quota(conn, current.team_id, current.name, max_count, max_bytes, size)
                old = [
                    _row(r)
                    for r in conn.execute(
                        sa.select(templates)
                        .where(templates.c.team_id == current.team_id)
                        .where(templates.c.name == current.name)
                        .where(templates.c.id != template_id)
                    )
                ]
                conn.execute(templates.delete().where(templates.c.id.in_([r.id for r in old])))
            conn.execute(
                templates.update()
                .where(templates.c.id == template_id)
                # A build's request is spent; a snapshot's names its source (`changes`).
                .values(**{"state": state, "updated_at": now, "request": {}, **changes})
            )
            found = conn.execute(sa.select(templates).where(templates.c.id == template_id)).one()
        return _row(found), old

    def delete_templates(
        self, team_id: str, name: str, *, only: str | None = None
    ) -> list[TemplateRow]:
        """Delete the team's rows of `name` (only the row `only`, when given); the rows
        deleted."""
        with self._write() as conn:
            query = (
                sa.select(templates)
                .where(templates.c.team_id == team_id)
                .where(templates.c.name == name)
            )
            if only is not None:
                query = query.where(templates.c.id == only)
            rows = [_row(r) for r in conn.execute(query)]
            conn.execute(templates.delete().where(templates.c.id.in_([r.id for r in rows])))
        return rows

    def live_sandboxes_of_template(self, team_id: str, name: str) -> list[str]:
        """The ids of the team's live sandboxes started from its template `name`."""
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.select(sandboxes.c.id)
                    .where(sandboxes.c.team_id == team_id)
                    .where(sandboxes.c.template == name)
                    .where(sandboxes.c.state.in_(LIVE_SANDBOX_STATES))
                ).scalars()
            )

    # -- the build step cache -----------------------------------------------------------

    def cached_layer(self, key: str) -> str | None:
        """The layer the step of cache `key` made, if any; marks the entry used."""
        with self._write() as conn:
            layer = conn.execute(
                sa.select(build_cache.c.layer).where(build_cache.c.key == key)
            ).scalar_one_or_none()
            if layer is not None:
                conn.execute(
                    build_cache.update()
                    .where(build_cache.c.key == key)
                    .values(last_used_at=datetime.now(UTC))
                )
        return layer

    def cache_layer(self, key: str, layer: str) -> None:
        now = datetime.now(UTC)
        with self._write() as conn:
            conn.execute(build_cache.delete().where(build_cache.c.key == key))
            conn.execute(
                build_cache.insert().values(key=key, layer=layer, created_at=now, last_used_at=now)
            )

    def forget_cached(self, layers: Sequence[str]) -> None:
        """Drop the cache entries naming `layers` (they were collected)."""
        with self._write() as conn:
            conn.execute(build_cache.delete().where(build_cache.c.layer.in_(list(layers))))

    def cache_entries(self) -> Mapping[str, str]:
        with self._read() as conn:
            return {r.key: r.layer for r in conn.execute(sa.select(build_cache))}
