"""Templates: a team's templates (one row per build) and the build step cache.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision (see 0001).
TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", ID, nullable=False),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("layers", JSON, nullable=False),
        sa.Column("env", JSON, nullable=False),
        sa.Column("workdir", sa.Text, nullable=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("start_cmd", sa.Text, nullable=True),
        sa.Column("ready_cmd", sa.Text, nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("build_job_id", ID, nullable=True),
        sa.Column("steps_total", sa.Integer, nullable=False),
        sa.Column("steps_cached", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("request", JSON, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.CheckConstraint(
            "state IN ('building', 'ready', 'failed', 'cancelled')", name="ck_templates_state"
        ),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_templates_team_id_teams", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_templates"),
    )
    op.create_index(
        "ix_templates_team_id_name_created_at", "templates", ["team_id", "name", "created_at"]
    )
    op.create_index("ix_templates_build_job_id", "templates", ["build_job_id"])
    op.create_table(
        "build_cache",
        sa.Column("key", sa.String(80), nullable=False),
        sa.Column("layer", sa.String(80), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("last_used_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_build_cache"),
    )
    op.create_index("ix_build_cache_layer", "build_cache", ["layer"])


def downgrade() -> None:
    op.drop_index("ix_build_cache_layer", "build_cache")
    op.drop_table("build_cache")
    op.drop_index("ix_templates_build_job_id", "templates")
    op.drop_index("ix_templates_team_id_name_created_at", "templates")
    op.drop_table("templates")
