"""What callers pass to the sandbox manager and what it returns, validated on the way in."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Literal, cast

from corral.errors import InvalidRequest
from corral.isolation import Limits, SandboxSpec
from corral.network.policy import NetworkPolicy
from corral.states import SandboxState
from corral.store import SandboxRow
from corral.volumes import VolumeSpec

MAX_TIMEOUT_SECONDS = 24 * 3600
MAX_METADATA = 64
MAX_METADATA_KEY = 128
MAX_METADATA_VALUE = 512
# Keys become JSON paths in List's filter queries: printable ASCII that needs no escaping.
_METADATA_KEY = re.compile(r"[ !#-\[\]-~]+")


def check_timeout(seconds: object, name: str = "timeout_seconds", *, zero_ok: bool = False) -> int:
    low = 0 if zero_ok else 1
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidRequest(f"{name}={seconds!r} must be a whole number of seconds")
    if not low <= seconds <= MAX_TIMEOUT_SECONDS:
        raise InvalidRequest(
            f"{name}={seconds} is out of range: use {low} to {MAX_TIMEOUT_SECONDS} (24 hours)"
        )
    return seconds


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA:
        raise InvalidRequest(f"metadata has {len(metadata)} entries; at most {MAX_METADATA}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest(f"metadata entries must be strings, got {key!r}={value!r}")
        if (
            not _METADATA_KEY.fullmatch(key)
            or len(key) > MAX_METADATA_KEY
            or len(value) > MAX_METADATA_VALUE
        ):
            raise InvalidRequest(
                f"metadata {key[:40]!r}: keys have 1 to {MAX_METADATA_KEY} printable ASCII "
                f"characters but no '\"' or '\\', values at most {MAX_METADATA_VALUE} characters"
            )
    return dict(metadata)


@dataclass(frozen=True)
class CreateOptions:
    """What a new sandbox should be; every field has a default."""

    template: str = "host"
    isolation: str = "auto"
    limits: Limits = field(default_factory=Limits)
    # Environment of every command, under each command's own envs.
    envs: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Lifetime: the sandbox is killed this long after creation unless set_timeout moves it.
    timeout_seconds: int = 300
    # What its deadline does: kill it, or pause it (E2B's autoPause); a sandbox paused
    # this way stays paused past its deadline until it is resumed or killed.
    on_timeout: Literal["kill", "pause"] = "kill"
    # Whether a pause by its timers keeps its memory (frozen) or only its filesystem
    # (paused to disk: see `corral.sandboxes.disk_pause`).
    pause_keeps_memory: bool = True
    # Inactivity TTL: 0 means none.
    idle_timeout_seconds: int = 0
    on_idle: Literal["pause", "kill"] = "pause"
    # What it may reach (the server's NetworkCap has the last word).
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    # Port exposure: anyone may reach the sandbox's ports through the port proxy (True),
    # or only callers with its traffic access token (False).
    public_ports: bool = False
    # Named volumes of the team, mounted at paths of the sandbox.
    volumes: tuple[VolumeSpec, ...] = ()
    # A layer template's writable layer (everything it writes in `/`) on a tmpfs of its
    # storage size (`Limits.storage_bytes`), so its writes count against its memory;
    # `host` sandboxes' storage is a tmpfs already.
    ram_disk: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.ram_disk, bool):
            raise InvalidRequest(f"ram_disk={self.ram_disk!r}: use True or False")
        if not isinstance(self.limits, Limits):
            raise InvalidRequest(f"limits must be a corral.isolation.Limits, got {self.limits!r}")
        if not isinstance(self.network, NetworkPolicy):
            raise InvalidRequest(f"network must be a NetworkPolicy, got {self.network!r}")
        for name in ("template", "isolation"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidRequest(f"{name} must be a non-empty string")
        # Copies: the caller's dicts may change after this; the spec checks the names.
        object.__setattr__(self, "envs", dict(SandboxSpec(env=dict(self.envs)).env))
        object.__setattr__(self, "metadata", check_metadata(self.metadata))
        check_timeout(self.timeout_seconds)
        check_timeout(self.idle_timeout_seconds, "idle_timeout_seconds", zero_ok=True)
        if self.on_idle not in ("pause", "kill"):
            raise InvalidRequest(f"on_idle={self.on_idle!r}: use 'pause' or 'kill'")
        if self.on_timeout not in ("pause", "kill"):
            raise InvalidRequest(f"on_timeout={self.on_timeout!r}: use 'pause' or 'kill'")
        if not isinstance(self.public_ports, bool):
            raise InvalidRequest(f"public_ports={self.public_ports!r}: use True or False")
        object.__setattr__(self, "volumes", tuple(VolumeSpec.of(v) for v in self.volumes))


@dataclass(frozen=True)
class SandboxRecord:
    """A sandbox as the API shows it to its team."""

    id: str
    team_id: str
    template: str
    isolation: str
    state: SandboxState
    # Why it is in this state: "created", "paused: idle for 300s", "killed: timeout" …
    state_reason: str
    metadata: dict[str, str]
    limits: Limits
    created_at: datetime
    expires_at: datetime
    idle_timeout_seconds: int
    on_idle: str
    last_activity_at: datetime
    network: NetworkPolicy
    # Port exposure: what the port proxy asks for (empty when the ports are public), and
    # the domain of its host names (`<port>-<id>.<ports_domain>`).
    traffic_token: str = ""
    public_ports: bool = False
    ports_domain: str = ""
    volumes: tuple[VolumeSpec, ...] = ()
    ram_disk: bool = False

    @classmethod
    def from_row(
        cls, row: SandboxRow, last_activity_at: datetime | None = None, ports_domain: str = ""
    ) -> SandboxRecord:
        return cls(
            id=row.id,
            team_id=row.team_id,
            template=row.template,
            isolation=row.isolation,
            state=cast(SandboxState, row.state),
            state_reason=row.state_reason,
            metadata=dict(row.metadata),
            limits=Limits(**row.limits),
            created_at=row.created_at,
            expires_at=row.expires_at,
            idle_timeout_seconds=row.idle_timeout_seconds,
            on_idle=row.on_idle,
            last_activity_at=max(row.last_activity_at, last_activity_at or row.last_activity_at),
            network=NetworkPolicy.parse(row.network["mode"], row.network["allow"]),
            traffic_token=row.traffic_token,
            public_ports=row.public_ports,
            ports_domain=ports_domain,
            volumes=tuple(VolumeSpec.of(v) for v in row.volumes),
            ram_disk=row.ram_disk,
        )


def limits_json(limits: Limits) -> dict[str, float | int]:
    return asdict(limits)


def network_json(policy: NetworkPolicy) -> dict[str, str | list[str]]:
    """A policy as a sandbox row stores it (`NetworkPolicy.parse` reads it back)."""
    return {"mode": policy.mode, "allow": list(policy.entries)}
