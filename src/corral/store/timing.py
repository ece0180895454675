"""The store's transactions timed into `corral_store_transaction_duration_seconds`, from
SQLAlchemy's connection events: every transaction of the engine, whichever part of the
store began it, from its begin to its commit or rollback."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy import event

from corral import instruments

_BEGAN = "corral_began"


def time_transactions(db: sa.Engine, *, write_option: str) -> None:
    """Record the duration of each transaction of `db` into the store's histogram, as a
    write when its connection has the execution option `write_option` (the store's
    writes set it to begin immediately), else as a read."""

    @event.listens_for(db, "begin")
    def began(conn: sa.Connection) -> None:
        conn.info[_BEGAN] = time.perf_counter()

    def ended(conn: sa.Connection) -> None:
        began = conn.info.pop(_BEGAN, None)
        if began is not None:
            kind = "write" if conn.get_execution_options().get(write_option) else "read"
            instruments.STORE_TRANSACTION.labels(kind=kind).observe(time.perf_counter() - began)

    event.listen(db, "commit", ended)
    event.listen(db, "rollback", ended)
