"""Job logs outside the rows, a running total of each team's logs, retention by age.

Log rows say how long they are (`size`) and, when their bytes are in the job's log file
rather than in `data`, where (`file_offset`); rows written before keep their bytes
inline. Teams keep the total of their jobs' logs (`log_bytes`), for the log quota.
Finished jobs are found by age for retention (an index on `finished_at`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_logs") as batch:
        batch.add_column(sa.Column("size", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("file_offset", sa.BigInteger, nullable=True))
    op.execute("UPDATE job_logs SET size = length(data)")
    with op.batch_alter_table("teams") as batch:
        batch.add_column(sa.Column("log_bytes", sa.BigInteger, nullable=False, server_default="0"))
    op.execute(
        "UPDATE teams SET log_bytes = "
        "(SELECT coalesce(sum(jobs.log_bytes), 0) FROM jobs WHERE jobs.team_id = teams.id)"
    )
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_finished_at", "jobs")
    with op.batch_alter_table("teams") as batch:
        batch.drop_column("log_bytes")
    # Bytes kept in log files cannot come back into the rows: those rows go.
    op.execute("DELETE FROM job_logs WHERE file_offset IS NOT NULL")
    with op.batch_alter_table("job_logs") as batch:
        batch.drop_column("file_offset")
        batch.drop_column("size")
