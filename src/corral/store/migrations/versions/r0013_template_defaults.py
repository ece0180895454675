"""A template's defaults for its sandboxes: `templates.sandbox_limits` (the limit fields
it sets, by name) and `templates.sandbox_network` (a policy, or null for none); and
`sandboxes.ram_disk` (its writable layer is a tmpfs).

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision (see 0001).
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        batch.add_column(sa.Column("sandbox_limits", JSON, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("sandbox_network", JSON, nullable=True))
    with op.batch_alter_table("sandboxes") as batch:
        batch.add_column(
            sa.Column("ram_disk", sa.Boolean, nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        batch.drop_column("ram_disk")
    with op.batch_alter_table("templates") as batch:
        batch.drop_column("sandbox_network")
        batch.drop_column("sandbox_limits")
