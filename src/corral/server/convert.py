"""Between the services' records and the API's messages, both ways, and request checks.

Every check of a request field that the services would not catch themselves (a NUL in a
path, a negative timeout) is here, so each bad input gets one clear `InvalidRequest`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from corral._state_enums import SANDBOX_STATE_NUMBERS
from corral.errors import InvalidRequest
from corral.limits import REQUEST_LIMITS
from corral.network.policy import NetworkPolicy
from corral.templates.defaults import given_limits as given
from corral.v1 import sandbox_pb2 as pb
from corral.v1 import volumes_pb2
from corral.volumes import VolumeSpec

if TYPE_CHECKING:
    from corral.guest import EntryInfo, ProcessInfo
    from corral.sandboxes import MetricPoint, SandboxRecord
    from corral.store.network_events import NetworkEventRow
    from corral.store.volumes import VolumeRow

_MAX_PATH = 4096
_MAX_ID = 64
_MAX_PAGE = 1000
_DEFAULT_PAGE = 100

E = TypeVar("E")  # a wire enum

IDLE_ACTIONS = {"pause": pb.IDLE_ACTION_PAUSE, "kill": pb.IDLE_ACTION_KILL}
IDLE_ACTION_NAMES = {
    pb.IDLE_ACTION_UNSPECIFIED: "pause",
    pb.IDLE_ACTION_PAUSE: "pause",
    pb.IDLE_ACTION_KILL: "kill",
}
METRICS_RANGES = {
    pb.METRICS_RANGE_UNSPECIFIED: "10m",
    pb.METRICS_RANGE_10M: "10m",
    pb.METRICS_RANGE_2H: "2h",
    pb.METRICS_RANGE_24H: "24h",
}
FILE_TYPES = {
    "file": pb.FILE_TYPE_FILE,
    "dir": pb.FILE_TYPE_DIR,
    "symlink": pb.FILE_TYPE_SYMLINK,
    "other": pb.FILE_TYPE_OTHER,
}


def timestamp(value: datetime | float | None) -> Timestamp | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def sandbox(record: SandboxRecord) -> pb.Sandbox:
    limits = record.limits
    return pb.Sandbox(
        id=record.id,
        template=record.template,
        isolation=record.isolation,
        state=SANDBOX_STATE_NUMBERS.get(record.state, pb.SANDBOX_STATE_UNSPECIFIED),
        state_reason=record.state_reason,
        metadata=record.metadata,
        limits=limits_message(asdict(limits)),
        created_at=timestamp(record.created_at),
        expires_at=timestamp(record.expires_at),
        idle_timeout_seconds=record.idle_timeout_seconds,
        on_idle=IDLE_ACTIONS.get(record.on_idle, pb.IDLE_ACTION_UNSPECIFIED),
        last_activity_at=timestamp(record.last_activity_at),
        network=network_message(record.network),
        traffic_access_token=record.traffic_token,
        public_ports=record.public_ports,
        ports_domain=record.ports_domain,
        volumes=[volume_mount(v) for v in record.volumes],
        ram_disk=record.ram_disk,
    )


def limits_message(values: Mapping[str, int | float]) -> pb.Limits:
    """The request limits among `values` as the wire's message (absent ones 0)."""
    return pb.Limits(**{name: values[name] for name in REQUEST_LIMITS if name in values})  # type: ignore[arg-type]


def volume_mount(spec: VolumeSpec) -> volumes_pb2.VolumeMount:
    return volumes_pb2.VolumeMount(name=spec.name, path=spec.path, read_only=spec.read_only)


def volume_specs(values: Iterable[volumes_pb2.VolumeMount]) -> tuple[VolumeSpec, ...]:
    return tuple(VolumeSpec(v.name, v.path, v.read_only) for v in values)


def volume(row: VolumeRow) -> volumes_pb2.Volume:
    return volumes_pb2.Volume(
        name=row.name,
        size_mib=row.size_mib,
        created_at=timestamp(row.created_at),
        used_bytes=row.used_bytes,
    )


def network_message(policy: NetworkPolicy) -> pb.NetworkPolicy:
    return pb.NetworkPolicy(mode=policy.mode, allow=policy.entries)


def metric_point(point: MetricPoint) -> pb.MetricPoint:
    return pb.MetricPoint(
        at=timestamp(point.at),
        cpu_percent=point.cpu_percent,
        memory_bytes=point.memory_bytes,
        memory_peak_bytes=point.memory_peak_bytes,
        pids=point.pids,
    )


def network_event(row: NetworkEventRow) -> pb.NetworkEvent:
    return pb.NetworkEvent(
        seq=row.seq,
        at=timestamp(row.at),
        kind=row.kind,
        decision=row.decision,
        rule=row.rule,
        protocol=row.protocol,
        address=row.address,
        port=row.port,
        name=row.name,
        answers=row.answers,
        count=row.count,
    )


def entry(info: EntryInfo) -> pb.EntryInfo:
    return pb.EntryInfo(
        name=info.name,
        path=info.path,
        type=FILE_TYPES.get(info.type, pb.FILE_TYPE_OTHER),
        size=info.size,
        mode=info.mode,
        modified_at=timestamp(info.mtime),
        symlink_target=info.symlink_target or "",
    )


def process(info: ProcessInfo) -> pb.ProcessInfo:
    return pb.ProcessInfo(
        pid=info.pid,
        argv=info.argv or [],
        cmd=info.cmd or "",
        tag=info.tag or "",
        background=info.background,
        started_at=timestamp(info.started_at),
        cwd=info.cwd or "",
        envs=info.envs or {},
        pty=info.pty,
    )


# -- request checks ------------------------------------------------------------------------


def sandbox_id(value: str) -> str:
    if not value:
        raise InvalidRequest("sandbox_id is empty; pass the id `corral sandbox list` shows")
    if len(value) > _MAX_ID or "\x00" in value:
        raise InvalidRequest("sandbox_id is malformed; pass the id `corral sandbox list` shows")
    return value


def path(value: str, field: str = "path") -> str:
    if not value:
        raise InvalidRequest(f"{field} is empty; pass a path inside the sandbox")
    if "\x00" in value:
        raise InvalidRequest(f"{field} contains a NUL character, which no path may hold")
    if len(value.encode()) > _MAX_PATH:
        raise InvalidRequest(f"{field} is longer than {_MAX_PATH} bytes")
    return value


def not_negative(value: float, field: str) -> None:
    if value < 0:
        raise InvalidRequest(f"{field}={value:g} is negative; pass 0 or more")


def states(values: Iterable[E], names: Mapping[E, str], enum: str) -> list[str]:
    """A list request's state filter: each wire enum number as its state's name."""
    chosen = []
    for value in values:
        if value not in names:
            raise InvalidRequest(f"states has {value}, which is not a {enum}")
        chosen.append(names[value])
    return chosen


def page_size(value: int) -> int:
    """A list request's page size; 0 asks for the default."""
    if not 0 <= value <= _MAX_PAGE:
        raise InvalidRequest(f"page_size={value} is out of range: use 0 to {_MAX_PAGE}")
    return value or _DEFAULT_PAGE


def strings(values: dict[str, str], field: str) -> dict[str, str]:
    for key, value in values.items():
        if not key or "\x00" in key or "\x00" in value:
            raise InvalidRequest(f"{field} has an empty key or a NUL character: {key!r}")
        if field == "envs" and "=" in key:
            raise InvalidRequest(f"envs key {key!r} contains '='")
    return dict(values)


def given_limits(value: pb.Limits, field: str = "limits") -> dict[str, int | float]:
    """The limit fields a request set (zero fields are unset: the template's defaults,
    else the server's, fill them); range errors say which."""
    for name in REQUEST_LIMITS:
        not_negative(getattr(value, name), f"{field}.{name}")
    return given({name: getattr(value, name) for name in REQUEST_LIMITS}, field)


def network(value: pb.NetworkPolicy) -> NetworkPolicy:
    """The policy asked for; an unset message (or mode "") is `none`."""
    return NetworkPolicy.parse(value.mode, list(value.allow))


def given_network(value: pb.NetworkPolicy) -> NetworkPolicy | None:
    """The policy a request named, or None when it named none (unset, or mode "" with no
    entries): the template's default, else `none`, applies."""
    if not value.mode and not value.allow:
        return None
    return network(value)
