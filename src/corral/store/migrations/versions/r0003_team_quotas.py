"""Team quotas bound a team's total: cores, writable storage, running jobs, stored logs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Existing teams get the defaults new teams get (corral.store.teams.DEFAULT_QUOTAS).
_COLUMNS = (
    sa.Column("max_cpu", sa.Float, nullable=False, server_default="16"),
    sa.Column("max_disk_mib", sa.Integer, nullable=False, server_default="20480"),
    sa.Column("max_running_jobs", sa.Integer, nullable=False, server_default="8"),
    sa.Column("max_log_mib", sa.Integer, nullable=False, server_default="1024"),
)


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        for column in _COLUMNS:
            batch.add_column(column)


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column.name)
