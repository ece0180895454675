"""The claim's indexes hold only what a claim reads: a team's queued jobs in its priority
order, and its running jobs; the idempotency keys' unique index only the jobs that have
one. Partial, they are the planner's choice even before PostgreSQL has statistics of a
new or fast-grown queue (see `corral.store.schema`); the index of every job by team and
state is gone.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM_INDEX = "ix_jobs_team_id_state_priority_created_at_id"
QUEUED_INDEX = "ix_jobs_queued_team_id_priority_created_at_id"
RUNNING_INDEX = "ix_jobs_running_team_id"
KEY_INDEX = "uq_jobs_team_id_idempotency_key"


def _where(condition: str) -> dict[str, Any]:
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def upgrade() -> None:
    # SQLite drops a table's constraint by copying the table (Alembic's batch mode).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(KEY_INDEX, type_="unique")
    op.create_index(
        KEY_INDEX,
        "jobs",
        ["team_id", "idempotency_key"],
        unique=True,
        **_where("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        QUEUED_INDEX,
        "jobs",
        ["team_id", sa.text("priority DESC"), "created_at", "id"],
        **_where("state = 'queued'"),
    )
    op.create_index(RUNNING_INDEX, "jobs", ["team_id"], **_where("state = 'running'"))
    op.drop_index(CLAIM_INDEX, table_name="jobs")


def downgrade() -> None:
    op.create_index(
        CLAIM_INDEX, "jobs", ["team_id", "state", sa.text("priority DESC"), "created_at", "id"]
    )
    op.drop_index(RUNNING_INDEX, table_name="jobs")
    op.drop_index(QUEUED_INDEX, table_name="jobs")
    op.drop_index(KEY_INDEX, table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.create_unique_constraint(KEY_INDEX, ["team_id", "idempotency_key"])
