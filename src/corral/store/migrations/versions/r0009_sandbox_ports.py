"""Port exposure: each sandbox's traffic access token, or public ports.

A sandbox's ports are reached through the server's port proxy with its traffic token
(empty when its ports are public). Sandboxes that existed before had no exposure; they
get an empty token and private ports: the proxy refuses them every request.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (
    sa.Column("traffic_token", sa.String(64), nullable=False, server_default=""),
    sa.Column("public_ports", sa.Boolean, nullable=False, server_default=sa.false()),
)


def upgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        for column in _COLUMNS:
            batch.add_column(column)


def downgrade() -> None:
    with op.batch_alter_table("sandboxes") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column.name)
