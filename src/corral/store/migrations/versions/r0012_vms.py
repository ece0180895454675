"""Vms (`corral vm`): the `vms` table.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision (see 0001).
TIME = sa.DateTime(timezone=True)
ID = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "vms",
        sa.Column("team_id", ID, nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("cpu", sa.Float, nullable=False),
        sa.Column("memory_mib", sa.Integer, nullable=False),
        sa.Column("network", sa.String(16), nullable=False),
        sa.Column("persist", sa.Boolean, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("sandbox_id", ID, nullable=True),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_vms_team_id_teams", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("team_id", "name", name="pk_vms"),
    )


def downgrade() -> None:
    op.drop_table("vms")
