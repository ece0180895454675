"""What the SDK returns: plain frozen dataclasses, the same for the sync and async API."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from google.protobuf.timestamp_pb2 import Timestamp

from corral.v1 import sandbox_pb2 as pb

FileType = Literal["file", "dir", "symlink", "other"]
_FILE_TYPES: dict[int, FileType] = {
    pb.FILE_TYPE_FILE: "file",
    pb.FILE_TYPE_DIR: "dir",
    pb.FILE_TYPE_SYMLINK: "symlink",
}
_STATES = {
    pb.SANDBOX_STATE_CREATING: "creating",
    pb.SANDBOX_STATE_RUNNING: "running",
    pb.SANDBOX_STATE_PAUSED: "paused",
    pb.SANDBOX_STATE_KILLED: "killed",
    pb.SANDBOX_STATE_FAILED: "failed",
}
STATE_NUMBERS = {name: number for number, name in _STATES.items()}


def _time(stamp: Timestamp, present: bool = True) -> datetime | None:
    if not present:
        return None
    return stamp.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True)
class Limits:
    """Resource limits of a sandbox; None takes the server's default."""

    memory_mib: int | None = None
    cpu: float | None = None
    pids: int | None = None
    disk_mib: int | None = None

    def to_proto(self) -> pb.Limits:
        return pb.Limits(
            memory_mib=self.memory_mib or 0,
            cpu=self.cpu or 0.0,
            pids=self.pids or 0,
            disk_mib=self.disk_mib or 0,
        )


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as the server last described it."""

    sandbox_id: str
    template: str
    isolation: str
    state: str  # creating | running | paused | killed | failed
    state_reason: str
    metadata: dict[str, str]
    limits: Limits
    created_at: datetime | None
    expires_at: datetime | None
    idle_timeout: int
    on_idle: str
    last_activity_at: datetime | None

    @classmethod
    def from_proto(cls, sandbox: pb.Sandbox) -> SandboxInfo:
        return cls(
            sandbox_id=sandbox.id,
            template=sandbox.template,
            isolation=sandbox.isolation,
            state=_STATES.get(sandbox.state, "unknown"),
            state_reason=sandbox.state_reason,
            metadata=dict(sandbox.metadata),
            limits=Limits(
                memory_mib=sandbox.limits.memory_mib,
                cpu=sandbox.limits.cpu,
                pids=sandbox.limits.pids,
                disk_mib=sandbox.limits.disk_mib,
            ),
            created_at=_time(sandbox.created_at, sandbox.HasField("created_at")),
            expires_at=_time(sandbox.expires_at, sandbox.HasField("expires_at")),
            idle_timeout=sandbox.idle_timeout_seconds,
            on_idle="kill" if sandbox.on_idle == pb.IDLE_ACTION_KILL else "pause",
            last_activity_at=_time(sandbox.last_activity_at, sandbox.HasField("last_activity_at")),
        )


@dataclass(frozen=True)
class CommandResult:
    """How a command ended, with its whole output decoded as UTF-8.

    `reason` is "exited", "timeout", "oom_killed", "killed" or "output_limit"; a command
    that did not simply exit is never `ok`. A non-zero exit raises nothing: check `ok`
    or `exit_code`.
    """

    stdout: str
    stderr: str
    exit_code: int
    reason: str = "exited"
    error: str | None = None
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.reason == "exited"


@dataclass(frozen=True)
class EntryInfo:
    """A file, directory or symlink in the sandbox (symlinks are not followed)."""

    name: str
    path: str
    type: FileType
    size: int
    mode: int
    modified_at: datetime | None = None
    symlink_target: str | None = None

    @classmethod
    def from_proto(cls, entry: pb.EntryInfo) -> EntryInfo:
        return cls(
            name=entry.name,
            path=entry.path,
            type=_FILE_TYPES.get(entry.type, "other"),
            size=entry.size,
            mode=entry.mode,
            modified_at=_time(entry.modified_at, entry.HasField("modified_at")),
            symlink_target=entry.symlink_target or None,
        )


@dataclass(frozen=True)
class ProcessInfo:
    """A process started in the sandbox that is still running."""

    pid: int
    argv: list[str] = field(default_factory=list)
    cmd: str = ""
    tag: str = ""
    background: bool = False
    started_at: datetime | None = None

    @classmethod
    def from_proto(cls, info: pb.ProcessInfo) -> ProcessInfo:
        return cls(
            pid=info.pid,
            argv=list(info.argv),
            cmd=info.cmd,
            tag=info.tag,
            background=info.background,
            started_at=_time(info.started_at, info.HasField("started_at")),
        )


@dataclass(frozen=True)
class MetricPoint:
    """Resource use of a sandbox over one step of its metrics range."""

    at: datetime | None
    cpu_percent: float
    memory_bytes: int
    memory_peak_bytes: int
    pids: int

    @classmethod
    def from_proto(cls, point: pb.MetricPoint) -> MetricPoint:
        return cls(
            at=_time(point.at, point.HasField("at")),
            cpu_percent=point.cpu_percent,
            memory_bytes=point.memory_bytes,
            memory_peak_bytes=point.memory_peak_bytes,
            pids=point.pids,
        )
