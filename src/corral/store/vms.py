"""Vm rows: a team's named sandbox definitions (`corral vm`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from corral.errors import UnknownVm, VmExists
from corral.store.database import Database
from corral.store.schema import vms


@dataclass(frozen=True)
class VmRow:
    """One vm as stored; `sandbox_id` is the sandbox it last started."""

    team_id: str
    name: str
    language: str
    cpu: float
    memory_mib: int
    network: str
    persist: bool
    created_at: datetime
    sandbox_id: str | None = None
    isolation: str = "auto"  # the tier of its sandboxes (rows before it: auto)


def _row(row: sa.Row[Any]) -> VmRow:
    return VmRow(**row._asdict())


class VmStore(Database):
    """Vm rows: insert, look up, list, set the sandbox, delete."""

    def insert_vm(self, row: VmRow) -> None:
        """Record a new vm, or VmExists for a name the team has."""
        with self._write() as conn:
            taken = conn.execute(
                sa.select(vms.c.name).where(vms.c.team_id == row.team_id)
                .where(vms.c.name == row.name)
            ).first()  # fmt: skip
            if taken is not None:
                raise VmExists(
                    f"the team has a vm named {row.name!r} already; choose another name or "
                    f"remove it (`corral vm clean {row.name}`)"
                )
            conn.execute(vms.insert().values(**asdict(row)))

    def vm(self, team_id: str, name: str) -> VmRow:
        """The team's vm `name`, or UnknownVm (another team's too)."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(vms).where(vms.c.team_id == team_id).where(vms.c.name == name)
            ).first()
        if found is None:
            raise UnknownVm(f"the team has no vm named {name!r}; `corral vm list --all` shows them")
        return _row(found)

    def vms(self, team_id: str) -> list[VmRow]:
        """The team's vms by name."""
        with self._read() as conn:
            found = conn.execute(
                sa.select(vms).where(vms.c.team_id == team_id).order_by(vms.c.name)
            ).all()
        return [_row(row) for row in found]

    def set_vm_sandbox(self, team_id: str, name: str, sandbox_id: str | None) -> None:
        with self._write() as conn:
            conn.execute(
                vms.update().where(vms.c.team_id == team_id).where(vms.c.name == name)
                .values(sandbox_id=sandbox_id)
            )  # fmt: skip

    def delete_vm(self, team_id: str, name: str) -> None:
        with self._write() as conn:
            conn.execute(vms.delete().where(vms.c.team_id == team_id).where(vms.c.name == name))
