"""Corral's durable state in SQL: SQLite (WAL) by default, PostgreSQL for a fleet.

Tables are SQLAlchemy Core (`corral.store.schema`); Alembic migrations
(`corral.store.migrations`) run to head whenever a store opens. The store knows rows,
not processes: what a sandbox *is* lives in `corral.sandboxes`.
"""

from corral.store.metrics import MetricPoint
from corral.store.sandboxes import SandboxEvent, SandboxRow
from corral.store.store import Store
from corral.store.teams import Team

__all__ = ["MetricPoint", "SandboxEvent", "SandboxRow", "Store", "Team"]
