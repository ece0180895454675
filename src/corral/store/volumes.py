"""Volume rows: a team's named volumes, created within its quotas.

The rows are what a team owns and sees; the data is an image file the sandbox side
(`corral.sandboxes.volumes`) makes and removes beside each row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from corral.errors import QuotaExceeded, UnknownVolume, VolumeExists
from corral.store.database import Database
from corral.store.schema import volumes
from corral.store.teams import lock_team


@dataclass(frozen=True)
class VolumeRow:
    """One volume as stored."""

    team_id: str
    name: str
    size_mib: int
    created_at: datetime
    # What its image took on the host's disk when last looked at.
    used_bytes: int = 0


def _row(row: sa.Row[Any]) -> VolumeRow:
    return VolumeRow(**row._asdict())


class VolumeStore(Database):
    """Volume rows: insert under the team's volume quota, look up, list, delete."""

    def insert_volume(self, row: VolumeRow, *, max_count: int, max_mib: int) -> None:
        """Record a new volume, or refuse it: VolumeExists for a name the team has,
        QuotaExceeded past `max_count` volumes or `max_mib` of sizes in all (checked in
        the insert's transaction, so concurrent creates count in turn)."""
        with self._write() as conn:
            lock_team(conn, row.team_id)
            taken = conn.execute(
                sa.select(volumes.c.name).where(volumes.c.team_id == row.team_id)
                .where(volumes.c.name == row.name)
            ).first()  # fmt: skip
            if taken is not None:
                raise VolumeExists(
                    f"the team has a volume named {row.name!r} already; choose another name "
                    "or delete that one"
                )
            count, total = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(volumes.c.size_mib), 0))
                .where(volumes.c.team_id == row.team_id)
            ).one()  # fmt: skip
            if count + 1 > max_count:
                raise QuotaExceeded(
                    f"the team has {count} volumes, its most (CORRAL_VOLUME_MAX_COUNT="
                    f"{max_count}); delete one first"
                )
            if total + row.size_mib > max_mib:
                raise QuotaExceeded(
                    f"a volume of {row.size_mib} MiB would take the team's volumes to "
                    f"{total + row.size_mib} MiB, past CORRAL_VOLUME_MAX_MIB={max_mib}; "
                    "ask for less or delete a volume"
                )
            conn.execute(volumes.insert().values(**asdict(row)))

    def volume(self, team_id: str, name: str) -> VolumeRow:
        """The team's volume `name`, or UnknownVolume (another team's too)."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(volumes).where(volumes.c.team_id == team_id)
                .where(volumes.c.name == name)
            ).first()  # fmt: skip
        if found is None:
            raise UnknownVolume(
                f"the team has no volume named {name!r}; `corral volume list` shows its volumes"
            )
        return _row(found)

    def volumes(self, team_id: str) -> list[VolumeRow]:
        """The team's volumes by name."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(volumes).where(volumes.c.team_id == team_id).order_by(volumes.c.name)
            ).all()
        return [_row(row) for row in found]

    def set_volume_usage(self, team_id: str, name: str, used_bytes: int) -> None:
        with self._write() as conn:
            conn.execute(
                volumes.update()
                .where(volumes.c.team_id == team_id)
                .where(volumes.c.name == name)
                .values(used_bytes=used_bytes)
            )

    def delete_volume(self, team_id: str, name: str) -> None:
        with self._write() as conn:
            conn.execute(
                volumes.delete().where(volumes.c.team_id == team_id).where(volumes.c.name == name)
            )
