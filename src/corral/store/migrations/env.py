"""Alembic's entry point: migrate the connection `corral.store` hands over.

Corral runs migrations only through `corral.store.database.migrate`, which passes an open
connection (inside a write transaction) in ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from corral.store.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run Corral's migrations through corral.store (Store.open)")

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters tables by copying them; batch mode does that for every ALTER.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
