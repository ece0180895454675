"""Per-team rate limits: `teams.max_api_rate` (requests a second per API key) and
`teams.max_api_streams` (streams open at once per API key); 0, as existing teams get,
means the server's CORRAL_API_RATE and CORRAL_API_STREAMS.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    sa.Column("max_api_rate", sa.Float, nullable=False, server_default="0"),
    sa.Column("max_api_streams", sa.Integer, nullable=False, server_default="0"),
)


def upgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        for column in _COLUMNS:
            batch.add_column(column)


def downgrade() -> None:
    with op.batch_alter_table("teams") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column.name)
