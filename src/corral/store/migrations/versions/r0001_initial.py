"""Teams, API keys, sandboxes, their events and metric points.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision: later changes to schema.py must not
# change what this migration creates.
TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(32)
STATES = "'creating', 'running', 'paused', 'killed', 'failed'"


def upgrade() -> None:
    op.create_table(
        "teams",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("max_sandboxes", sa.Integer, nullable=False),
        sa.Column("max_memory_mib", sa.Integer, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_teams"),
        sa.UniqueConstraint("name", name="uq_teams_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", ID, nullable=False),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("revoked_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_api_keys_team_id_teams", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.create_index("ix_api_keys_team_id", "api_keys", ["team_id"])
    op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"])
    op.create_table(
        "sandboxes",
        sa.Column("id", ID, nullable=False),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("template", sa.String(128), nullable=False),
        sa.Column("isolation", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("limits", JSON, nullable=False),
        sa.Column("envs", JSON, nullable=False),
        sa.Column("timeout_seconds", sa.Integer, nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
        sa.Column("idle_timeout_seconds", sa.Integer, nullable=False),
        sa.Column("on_idle", sa.String(8), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.Column("last_activity_at", TIME, nullable=False),
        sa.Column("owner_host", sa.String(255), nullable=False),
        sa.Column("owner_pid", sa.Integer, nullable=False),
        sa.Column("owner_start", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sandboxes"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_sandboxes_team_id_teams", ondelete="CASCADE"
        ),
        sa.CheckConstraint(f"state IN ({STATES})", name="ck_sandboxes_state"),
        sa.CheckConstraint("on_idle IN ('pause', 'kill')", name="ck_sandboxes_on_idle"),
    )
    op.create_index(
        "ix_sandboxes_team_id_created_at_id", "sandboxes", ["team_id", "created_at", "id"]
    )
    op.create_index("ix_sandboxes_team_id_state", "sandboxes", ["team_id", "state"])
    op.create_index("ix_sandboxes_state", "sandboxes", ["state"])
    op.create_table(
        "sandbox_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sandbox_id", ID, nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_sandbox_events"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.id"],
            name="fk_sandbox_events_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_sandbox_events_sandbox_id_id", "sandbox_events", ["sandbox_id", "id"])
    op.create_table(
        "metric_points",
        sa.Column("sandbox_id", ID, nullable=False),
        sa.Column("resolution", sa.String(8), nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("cpu_percent", sa.Float, nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=False),
        sa.Column("memory_peak_bytes", sa.BigInteger, nullable=False),
        sa.Column("pids", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("sandbox_id", "resolution", "at", name="pk_metric_points"),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.id"],
            name="fk_metric_points_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    op.drop_table("metric_points")
    op.drop_table("sandbox_events")
    op.drop_table("sandboxes")
    op.drop_table("api_keys")
    op.drop_table("teams")
