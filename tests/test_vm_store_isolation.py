"""`vms.isolation` (migration 0015): a vm stored before the column existed reads as
`auto`, the tier it ran on then (the server's default); one stored with a tier keeps it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from corral.config import Settings
from corral.store import Store
from corral.store.database import alembic_config
from corral.store.vms import VmRow


def vm(team_id: str, name: str, isolation: str) -> VmRow:
    return VmRow(
        team_id=team_id,
        name=name,
        language="python",
        cpu=1.0,
        memory_mib=512,
        network="none",
        persist=False,
        created_at=datetime.now(UTC),
        isolation=isolation,
    )


@pytest.mark.usefixtures("database")  # on SQLite and PostgreSQL
def test_a_vm_from_before_the_column_reads_as_auto(store_settings: Settings) -> None:
    store = Store.open(store_settings)
    team = store.create_team("vms")
    store.insert_vm(vm(team.id, "old", "gvisor"))

    # Back to the schema before 0015 (the column and what it held are gone), and up again.
    # On the store's database, but not through its connections: SQLite's would have foreign
    # keys on, and the downgrades' table copies (batch mode) would then cascade-delete rows.
    db = sa.create_engine(store._db.url)
    with db.begin() as conn:
        command.downgrade(alembic_config(conn), "0014")
        columns = {c["name"] for c in sa.inspect(conn).get_columns("vms")}
        assert "isolation" not in columns
    db.dispose()
    store.close()

    store = Store.open(store_settings)
    try:
        assert store.vm(team.id, "old").isolation == "auto"
        store.insert_vm(vm(team.id, "new", "gvisor"))
        assert store.vm(team.id, "new").isolation == "gvisor"
    finally:
        store.close()
