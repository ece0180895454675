"""Fair claims: the queue is ordered per team (its own priorities), teams take turns.

The claim looks up, per team, its best queued job, its count of running jobs and when
its last job started; the index of the old claim order (all teams' jobs by priority) is
no longer used.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM_INDEX = "ix_jobs_team_id_state_priority_created_at_id"


def upgrade() -> None:
    op.drop_index("ix_jobs_state_priority_created_at", table_name="jobs")
    op.create_index(
        CLAIM_INDEX,
        "jobs",
        ["team_id", "state", sa.text("priority DESC"), "created_at", "id"],
    )
    op.create_index("ix_jobs_team_id_started_at", "jobs", ["team_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_team_id_started_at", table_name="jobs")
    op.drop_index(CLAIM_INDEX, table_name="jobs")
    op.create_index(
        "ix_jobs_state_priority_created_at", "jobs", ["state", "priority", "created_at"]
    )
