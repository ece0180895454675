"""Named volumes: a team's persistent directories, mounted into its sandboxes and jobs.

A volume is a row (`corral.store.volumes`: its team, name and size) and an ext4 image of
that size at DATA/volumes/<team id>/<name>.img (`corral.isolation.volumes`: the size
bound is the file system's own). A team sees and mounts only its own: another team's
name is NotFound like one that does not exist, and the path of the image is made from
the team's id, never from what a caller sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from corral.config import Settings
from corral.errors import InvalidRequest
from corral.isolation.volumes import (
    VolumeMount,
    check_mounts,
    create_image,
    delete_image,
    used_bytes,
)
from corral.store import Store, Team
from corral.store.volumes import VolumeRow
from corral.volumes import VolumeSpec, check_volume_name


class Volumes:
    """The teams' volumes: create, look up, list, delete, and resolve for a sandbox."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def image(self, team_id: str, name: str) -> Path:
        return self.settings.data_dir / "volumes" / team_id / f"{name}.img"

    def create(self, team: Team, name: str, size_mib: int) -> VolumeRow:
        check_volume_name(name)
        most = self.settings.volume_max_mib
        if isinstance(size_mib, bool) or not isinstance(size_mib, int) or not 1 <= size_mib <= most:
            raise InvalidRequest(
                f"volume size {size_mib!r} MiB is out of range: use 1 to {most} "
                "(CORRAL_VOLUME_MAX_MIB)"
            )
        row = VolumeRow(team.id, name, size_mib, datetime.now(UTC), 0)
        self.store.insert_volume(
            row, max_count=self.settings.volume_max_count, max_mib=self.settings.volume_max_mib
        )
        image = self.image(team.id, name)
        try:
            # The row is new: any image of that name is a leftover of a crashed delete.
            image.unlink(missing_ok=True)
            create_image(image, size_mib << 20)
        except BaseException:
            self.store.delete_volume(team.id, name)
            raise
        return self._looked_at(row)

    def get(self, team: Team, name: str) -> VolumeRow:
        return self._looked_at(self.store.volume(team.id, check_volume_name(name)))

    def list(self, team: Team) -> list[VolumeRow]:
        return [self._looked_at(row) for row in self.store.volumes(team.id)]

    def delete(self, team: Team, name: str) -> None:
        """Delete the volume and its data; VolumeInUse while a sandbox has it mounted."""
        row = self.store.volume(team.id, check_volume_name(name))
        delete_image(self.image(team.id, row.name))
        self.store.delete_volume(team.id, row.name)

    def mounts(self, team_id: str, specs: Sequence[VolumeSpec]) -> tuple[VolumeMount, ...]:
        """The engine's mounts for `specs`: each a volume of the team (UnknownVolume if
        not), at a valid path (InvalidRequest if not)."""
        mounts = []
        for spec in specs:
            if not isinstance(spec, VolumeSpec):
                raise InvalidRequest(f"volumes must be VolumeSpec entries, got {spec!r}")
            row = self.store.volume(team_id, spec.name)
            mounts.append(
                VolumeMount(row.name, self.image(team_id, row.name), spec.path, spec.read_only)
            )
        return check_mounts(mounts)

    def _looked_at(self, row: VolumeRow) -> VolumeRow:
        used = used_bytes(self.image(row.team_id, row.name))
        if used != row.used_bytes:
            self.store.set_volume_usage(row.team_id, row.name, used)
        return VolumeRow(row.team_id, row.name, row.size_mib, row.created_at, used)
