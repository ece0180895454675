"""Claims that fit the host: each job says how much memory its sandbox asks for.

A worker claims only jobs whose `memory_mib` fits its host's free memory, so a job waiting
for room stays queued instead of being claimed and given back again and again. Existing
jobs get theirs from their spec's limits, else the default (512 MiB, `Limits()`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_MEMORY_MIB = 512  # Limits().memory_mib when this revision was written


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column(
                "memory_mib",
                sa.Integer,
                nullable=False,
                server_default=str(DEFAULT_MEMORY_MIB),
            )
        )
    # Read in Python rather than with a dialect's JSON operators: the same on SQLite and
    # PostgreSQL. Only jobs whose spec set a memory limit change.
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("spec", sa.JSON))
    conn = op.get_bind()
    changes = []
    for job_id, spec in conn.execute(sa.select(jobs.c.id, jobs.c.spec)):
        limits = spec.get("limits") if isinstance(spec, dict) else None
        memory = limits.get("memory_mib") if isinstance(limits, dict) else None
        if isinstance(memory, int) and memory != DEFAULT_MEMORY_MIB:
            changes.append({"job_id": job_id, "memory_mib": memory})
    if changes:
        conn.execute(
            sa.text("UPDATE jobs SET memory_mib = :memory_mib WHERE id = :job_id"), changes
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("memory_mib")
