"""Jobs: the queue, their events, log chunks and the callback outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types of this revision (see 0001).
TIME = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(32)
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
STATES = "'queued', 'running', 'succeeded', 'failed', 'timed_out', 'canceled', 'lost'"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", ID, nullable=False),
        sa.Column("team_id", ID, nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("template", sa.String(128), nullable=False),
        sa.Column("isolation", sa.String(32), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("lost_count", sa.Integer, nullable=False),
        sa.Column("run_after", TIME, nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", TIME, nullable=True),
        sa.Column("cancel_reason", sa.Text, nullable=True),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("next_log_seq", sa.BigInteger, nullable=False),
        sa.Column("log_bytes", sa.BigInteger, nullable=False),
        sa.Column("log_truncated", sa.Boolean, nullable=False),
        sa.Column("next_event_seq", sa.Integer, nullable=False),
        sa.Column("callback_url", sa.Text, nullable=True),
        sa.Column("callback_secret", sa.String(64), nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("finished_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(
            ["team_id"], ["teams.id"], name="fk_jobs_team_id_teams", ondelete="CASCADE"
        ),
        sa.CheckConstraint(f"state IN ({STATES})", name="ck_jobs_state"),
        sa.UniqueConstraint("team_id", "idempotency_key", name="uq_jobs_team_id_idempotency_key"),
    )
    op.create_index(
        "ix_jobs_state_priority_created_at", "jobs", ["state", "priority", "created_at"]
    )
    op.create_index("ix_jobs_team_id_created_at_id", "jobs", ["team_id", "created_at", "id"])
    op.create_index("ix_jobs_state_lease_expires_at", "jobs", ["state", "lease_expires_at"])
    op.create_table(
        "job_events",
        sa.Column("job_id", ID, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("at", TIME, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq", name="pk_job_events"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_events_job_id_jobs", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "job_logs",
        sa.Column("job_id", ID, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("stream", sa.SmallInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq", name="pk_job_logs"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_logs_job_id_jobs", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "job_callbacks",
        sa.Column("id", BIGID, nullable=False),
        sa.Column("job_id", ID, nullable=False),
        sa.Column("event_seq", sa.Integer, nullable=False),
        sa.Column("critical", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", TIME, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("delivered_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job_callbacks"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_callbacks_job_id_jobs", ondelete="CASCADE"
        ),
    )
    op.create_index(
        "ix_job_callbacks_state_next_attempt_at", "job_callbacks", ["state", "next_attempt_at"]
    )
    op.create_index("ix_job_callbacks_job_id", "job_callbacks", ["job_id"])


def downgrade() -> None:
    op.drop_table("job_callbacks")
    op.drop_table("job_logs")
    op.drop_table("job_events")
    op.drop_table("jobs")
