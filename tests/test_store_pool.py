"""The store's PostgreSQL connection pool: a connection the server hung up on is replaced
at checkout, without a round trip to ask (see `corral.store.database._drop_hung_up`)."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from corral.store import Store
from tests.kit.postgres import Cluster


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_connections_the_server_terminated_are_replaced_not_failed(
    store: Store, postgres: Cluster
) -> None:
    # Several connections in the pool, all idle now.
    with store._db.connect() as a, store._db.connect() as b:
        a.execute(sa.text("SELECT 1"))
        b.execute(sa.text("SELECT 1"))
    assert store._db.pool.checkedin() >= 2  # type: ignore[attr-defined]
    database = store._db.url.database
    killer = sa.create_engine(store._db.url, poolclass=sa.pool.NullPool)
    with killer.connect() as conn:
        killed = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"
            ),
            {"db": database},
        ).scalar_one()
    killer.dispose()
    assert killed >= 2
    time.sleep(0.2)  # the server's goodbye reaches the pooled sockets
    # Every request after the restart works: reads and writes, more than the pool held.
    for name in ("acme", "beta", "gamma"):
        team = store.create_team(name)
        assert store.team(name).id == team.id
