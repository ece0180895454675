"""The tables of Corral's store, in SQLAlchemy Core, portable to SQLite and PostgreSQL.

Portable means: no dialect-only SQL, timestamps as timezone-aware UTC (`UTCDateTime`),
JSON through `sqlalchemy.JSON` (JSONB on PostgreSQL), named constraints so Alembic can
alter them on either database. The migrations in `corral.store.migrations` create
exactly these tables; a test checks that the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

# Sandbox states, in the order of the state machine.
SANDBOX_STATES = ("creating", "running", "paused", "killed", "failed")
LIVE_STATES = ("creating", "running", "paused")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database.

    SQLite has no time zones: values are stored as naive UTC text and come back aware.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Corral stores aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(32)

metadata = sa.MetaData(naming_convention=NAMING)

teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("max_sandboxes", sa.Integer, nullable=False),
    sa.Column("max_memory_mib", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    # The first characters of the key, to show and to revoke by; never the whole key.
    sa.Column("prefix", sa.String(16), nullable=False),
    # sha256 hex digest of the whole key.
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Index(None, "team_id"),
    sa.Index(None, "prefix"),
)

sandboxes = sa.Table(
    "sandboxes",
    metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("team_id", ID, sa.ForeignKey("teams.id", ondelete="CASCADE"), nullable=False),
    sa.Column("template", sa.String(128), nullable=False),
    sa.Column("isolation", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False),
    sa.Column("metadata", JSON, nullable=False),
    sa.Column("limits", JSON, nullable=False),
    sa.Column("envs", JSON, nullable=False),
    sa.Column("timeout_seconds", sa.Integer, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Column("idle_timeout_seconds", sa.Integer, nullable=False),
    sa.Column("on_idle", sa.String(8), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("last_activity_at", UTCDateTime, nullable=False),
    # The server process that runs the sandbox: host name, pid and kernel start time
    # (clock ticks), so a restarted server can tell a dead owner from a live one, and
    # servers sharing one database judge only their own host's rows.
    sa.Column("owner_host", sa.String(255), nullable=False),
    sa.Column("owner_pid", sa.Integer, nullable=False),
    sa.Column("owner_start", sa.BigInteger, nullable=False),
    sa.CheckConstraint(sa.column("state").in_(SANDBOX_STATES), name="state"),
    sa.CheckConstraint(sa.column("on_idle").in_(("pause", "kill")), name="on_idle"),
    # List pages: a team's sandboxes in creation order, filtered by state.
    sa.Index(None, "team_id", "created_at", "id"),
    sa.Index(None, "team_id", "state"),
    # Start-up: every live row, to find those whose server died.
    sa.Index(None, "state"),
)

sandbox_events = sa.Table(
    "sandbox_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("sandbox_id", ID, sa.ForeignKey("sandboxes.id", ondelete="CASCADE"), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index(None, "sandbox_id", "id"),
)

metric_points = sa.Table(
    "metric_points",
    metadata,
    sa.Column(
        "sandbox_id",
        ID,
        sa.ForeignKey("sandboxes.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # "10m", "2h" or "24h": which ring the point comes from.
    sa.Column("resolution", sa.String(8), primary_key=True),
    sa.Column("at", UTCDateTime, primary_key=True),
    sa.Column("cpu_percent", sa.Float, nullable=False),
    sa.Column("memory_bytes", sa.BigInteger, nullable=False),
    sa.Column("memory_peak_bytes", sa.BigInteger, nullable=False),
    sa.Column("pids", sa.Integer, nullable=False),
)
