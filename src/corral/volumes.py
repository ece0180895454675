"""What a sandbox or a job asks of a named volume: which one, at what path, read-only or
not. Shared by the SDK, the CLI, job specs and the server; the server checks the path
(`corral.isolation.volumes.check_mounts`) and that the volume is the team's."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from corral.errors import InvalidRequest

# Like template names: lower case, 1-63 characters, starting with a letter or digit.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_volume_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidRequest(
            f"volume name {name!r} is invalid: use 1 to 63 lower-case letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (e.g. cache-1)"
        )
    return name


@dataclass(frozen=True)
class VolumeSpec:
    """The volume `name` of the team, mounted at `path` (read-only with `read_only`)."""

    name: str
    path: str
    read_only: bool = False

    def __post_init__(self) -> None:
        check_volume_name(self.name)
        if not isinstance(self.path, str) or not isinstance(self.read_only, bool):
            raise InvalidRequest(
                f"volume {self.name!r}: path must be a string and read_only True or False"
            )

    @classmethod
    def parse(cls, text: str) -> VolumeSpec:
        """`NAME:/path` or `NAME:/path:ro` (the CLI's `--volume`)."""
        name, sep, rest = text.partition(":")
        path, ro = rest, False
        if rest.endswith((":ro", ":rw")):
            path, ro = rest[:-3], rest.endswith(":ro")
        if not sep or not path:
            raise InvalidRequest(
                f"volume {text!r}: write NAME:/path or NAME:/path:ro, e.g. cache:/data"
            )
        return cls(name, path, ro)

    @classmethod
    def of(cls, value: object) -> VolumeSpec:
        """A VolumeSpec from one, from `NAME:/path[:ro]`, or from a mapping with `name`,
        `path` and optionally `read_only`."""
        if isinstance(value, VolumeSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, Mapping):
            unknown = set(value) - {"name", "path", "read_only"}
            if unknown or "name" not in value or "path" not in value:
                raise InvalidRequest(
                    f"volume {dict(value)!r}: give name, path and optionally read_only"
                )
            return cls(value["name"], value["path"], value.get("read_only", False))
        raise InvalidRequest(
            f"volume {value!r}: give NAME:/path[:ro], a mapping {{name, path, read_only}} "
            "or a VolumeSpec"
        )

    def __str__(self) -> str:
        return f"{self.name}:{self.path}" + (":ro" if self.read_only else "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "read_only": self.read_only}
