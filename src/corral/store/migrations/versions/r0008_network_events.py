"""Network events: what each sandbox's network did (DNS, connections, rate-limit counts).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision (see 0001).
TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "network_events",
        sa.Column("sandbox_id", ID, nullable=False),
        sa.Column("seq", sa.BigInteger, autoincrement=False, nullable=False),
        sa.Column("job_id", ID, nullable=True),
        sa.Column("job_seq", sa.Integer, nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("rule", sa.Text, nullable=False),
        sa.Column("protocol", sa.String(8), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("answers", JSON, nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name="fk_network_events_job_id_jobs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sandbox_id", "seq", name="pk_network_events"),
    )
    op.create_index("ix_network_events_job_id_job_seq", "network_events", ["job_id", "job_seq"])


def downgrade() -> None:
    op.drop_index("ix_network_events_job_id_job_seq", "network_events")
    op.drop_table("network_events")
