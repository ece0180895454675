"""Named volumes: the `volumes` table, and the volumes of each sandbox.

Sandboxes that existed before had none.

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
        "volumes",
        sa.Column("team_id", ID, nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("size_mib", sa.Integer, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("used_bytes", sa.BigInteger, nullable=False),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_volumes_team_id_teams", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("team_id", "name", name="pk_volumes"),
    )
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(sa.Column("volumes", JSON, nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("volumes")
    op.drop_table("volumes")
