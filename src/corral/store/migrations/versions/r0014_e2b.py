"""E2B compatibility: the `e2b_sandboxes` table (a sandbox's envd access token, client
id, template alias, auto-pause and env vars as E2B's API gave them).

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision (see 0001).
ID = sa.String(32)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "e2b_sandboxes",
        sa.Column("sandbox_id", ID, nullable=False),
        sa.Column("envd_access_token", sa.String(64), nullable=False),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("alias", sa.String(128), nullable=False),
        sa.Column("auto_pause", sa.Boolean, nullable=False),
        sa.Column("envs", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["sandbox_id"],
            ["sandboxes.id"],
            name="fk_e2b_sandboxes_sandbox_id_sandboxes",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sandbox_id", name="pk_e2b_sandboxes"),
    )


def downgrade() -> None:
    op.drop_table("e2b_sandboxes")
