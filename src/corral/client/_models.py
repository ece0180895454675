"""What the SDK returns: plain frozen dataclasses, the same for the sync and async API."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from google.protobuf.timestamp_pb2 import Timestamp

from corral._state_enums import JOB_STATE_NAMES, SANDBOX_STATE_NAMES, TEMPLATE_STATE_NAMES
from corral.errors import InvalidRequest
from corral.limits import REQUEST_LIMITS
from corral.network.policy import NetworkPolicy
from corral.states import JOB_FINAL_STATES
from corral.v1 import jobs_pb2 as jobs_pb
from corral.v1 import sandbox_pb2 as pb
from corral.v1 import templates_pb2 as templates_pb
from corral.v1 import vms_pb2 as vms_pb
from corral.v1 import volumes_pb2 as volumes_pb
from corral.volumes import VolumeSpec

FileType = Literal["file", "dir", "symlink", "other"]
_FILE_TYPES: dict[int, FileType] = {
    pb.FILE_TYPE_FILE: "file",
    pb.FILE_TYPE_DIR: "dir",
    pb.FILE_TYPE_SYMLINK: "symlink",
}


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
    bandwidth_mbit: int | None = None  # each way; None: no cap
    connections: int | None = None  # open at once

    def to_proto(self) -> pb.Limits:
        for name in ("memory_mib", "cpu", "pids", "disk_mib", "bandwidth_mbit", "connections"):
            value = getattr(self, name)
            if value is not None and not value > 0:  # 0 on the wire means "the default"
                raise InvalidRequest(
                    f"Limits({name}={value!r}): give a positive number, or None for the"
                    " server's default"
                )
        return pb.Limits(
            memory_mib=self.memory_mib or 0,
            cpu=self.cpu or 0.0,
            pids=self.pids or 0,
            disk_mib=self.disk_mib or 0,
            bandwidth_mbit=self.bandwidth_mbit or 0,
            connections=self.connections or 0,
        )


@dataclass(frozen=True)
class Network:
    """What a sandbox may reach: `none` (loopback only), `internet` (public addresses),
    or `allowlist` (only `allow`: domains, `*.` wildcards, CIDRs, optional ports)."""

    mode: str = "none"
    allow: tuple[str, ...] = ()

    @classmethod
    def parse(cls, mode: str = "none", allow: Iterable[str] = ()) -> Network:
        """Checked here, as the server checks it (aliases resolved, entries normalised)."""
        policy = NetworkPolicy.parse(mode, allow)
        return cls(policy.mode, policy.entries)

    @classmethod
    def of(cls, value: Network | str | Mapping[str, Any] | None) -> Network:
        """A policy from a Network, a mode, {"mode": …, "allow": […]}, or None (none)."""
        if isinstance(value, Network):
            return value
        if value is None or isinstance(value, str):
            return cls.parse(value or "none")
        if isinstance(value, Mapping):
            unknown = set(value) - {"mode", "allow"}
            if unknown:
                raise InvalidRequest(
                    f"network has unknown keys {sorted(unknown)}; write "
                    '{"mode": "allowlist", "allow": ["pypi.org", ...]}'
                )
            return cls.parse(value.get("mode") or "none", value.get("allow") or ())
        raise InvalidRequest(
            f"network must be a mode (none, internet, allowlist), a mapping with mode and "
            f"allow, or a Network; got {type(value).__name__}"
        )

    def __str__(self) -> str:
        return f"{self.mode}: {', '.join(self.allow)}" if self.allow else self.mode

    @classmethod
    def from_proto(cls, message: pb.NetworkPolicy) -> Network:
        return cls(message.mode or "none", tuple(message.allow))

    def to_proto(self) -> pb.NetworkPolicy:
        return pb.NetworkPolicy(mode=self.mode, allow=self.allow)


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
    network: Network = field(default_factory=Network)
    # Port exposure: the token the port proxy asks for ("" when the ports are public),
    # and the domain of the ports' host names.
    traffic_token: str = ""
    public_ports: bool = False
    ports_domain: str = ""
    # Its named volumes and where they are mounted.
    volumes: tuple[VolumeSpec, ...] = ()
    # Its writable layer is a tmpfs: what it writes counts against its memory.
    ram_disk: bool = False

    @classmethod
    def from_proto(cls, sandbox: pb.Sandbox) -> SandboxInfo:
        return cls(
            sandbox_id=sandbox.id,
            template=sandbox.template,
            isolation=sandbox.isolation,
            state=SANDBOX_STATE_NAMES.get(sandbox.state, "unknown"),
            state_reason=sandbox.state_reason,
            metadata=dict(sandbox.metadata),
            limits=Limits(
                memory_mib=sandbox.limits.memory_mib,
                cpu=sandbox.limits.cpu,
                pids=sandbox.limits.pids,
                disk_mib=sandbox.limits.disk_mib,
                bandwidth_mbit=sandbox.limits.bandwidth_mbit,
                connections=sandbox.limits.connections,
            ),
            created_at=_time(sandbox.created_at, sandbox.HasField("created_at")),
            expires_at=_time(sandbox.expires_at, sandbox.HasField("expires_at")),
            idle_timeout=sandbox.idle_timeout_seconds,
            on_idle="kill" if sandbox.on_idle == pb.IDLE_ACTION_KILL else "pause",
            last_activity_at=_time(sandbox.last_activity_at, sandbox.HasField("last_activity_at")),
            network=Network.from_proto(sandbox.network),
            traffic_token=sandbox.traffic_access_token,
            public_ports=sandbox.public_ports,
            ports_domain=sandbox.ports_domain,
            volumes=tuple(VolumeSpec(v.name, v.path, v.read_only) for v in sandbox.volumes),
            ram_disk=sandbox.ram_disk,
        )


@dataclass(frozen=True)
class VolumeInfo:
    """A named volume as the server last described it."""

    name: str
    size_mib: int
    created_at: datetime | None
    # What its data took on the server's disk when it last looked.
    used_bytes: int

    @classmethod
    def from_proto(cls, volume: volumes_pb.Volume) -> VolumeInfo:
        return cls(
            name=volume.name,
            size_mib=volume.size_mib,
            created_at=_time(volume.created_at, volume.HasField("created_at")),
            used_bytes=volume.used_bytes,
        )


@dataclass(frozen=True)
class VmInfo:
    """A vm (`corral vm`) as the server last described it. `state` is building (its
    language template builds), failed (that build failed: `error`), stopped or running
    (its sandbox is `sandbox_id`)."""

    name: str
    language: str
    cpu: float
    memory_mib: int
    network: str
    persist: bool
    created_at: datetime | None
    state: str
    sandbox_id: str | None
    template: str
    volume: str | None
    error: str | None
    isolation: str = "auto"  # the tier of its sandboxes (auto: the server's default)

    @classmethod
    def from_proto(cls, vm: vms_pb.Vm) -> VmInfo:
        return cls(
            name=vm.name,
            language=vm.language,
            cpu=vm.cpu,
            memory_mib=vm.memory_mib,
            network=vm.network,
            persist=vm.persist,
            created_at=_time(vm.created_at, vm.HasField("created_at")),
            state=vm.state,
            sandbox_id=vm.sandbox_id or None,
            template=vm.template,
            volume=vm.volume or None,
            error=vm.error or None,
            isolation=vm.isolation or "auto",
        )


def volume_mounts(volumes: Iterable[object] | None) -> list[volumes_pb.VolumeMount]:
    """`volumes=` of a create: VolumeSpecs, "NAME:/path[:ro]" strings or mappings."""
    if isinstance(volumes, str | bytes):
        raise InvalidRequest(f"volumes must be a list, e.g. ['cache:/data'], not {volumes!r}")
    specs = [VolumeSpec.of(v) for v in volumes or ()]
    return [volumes_pb.VolumeMount(name=v.name, path=v.path, read_only=v.read_only) for v in specs]


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
class WriteEntry:
    """One file for `files.write([...])`: its path and its data (as E2B's `WriteEntry`)."""

    path: str
    data: str | bytes


@dataclass(frozen=True)
class ProcessInfo:
    """A process started in the sandbox that is still running."""

    pid: int
    argv: list[str] = field(default_factory=list)
    cmd: str = ""
    tag: str = ""
    background: bool = False
    started_at: datetime | None = None
    cwd: str = ""
    envs: dict[str, str] = field(default_factory=dict)  # those its start set
    pty: bool = False  # it runs on a terminal (`sandbox.pty`)

    @classmethod
    def from_proto(cls, info: pb.ProcessInfo) -> ProcessInfo:
        return cls(
            pid=info.pid,
            argv=list(info.argv),
            cmd=info.cmd,
            tag=info.tag,
            background=info.background,
            started_at=_time(info.started_at, info.HasField("started_at")),
            cwd=info.cwd,
            envs=dict(info.envs),
            pty=info.pty,
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


@dataclass(frozen=True)
class NetworkEvent:
    """One decision about a sandbox's traffic, in order (`seq`, from 0 per sandbox).

    `kind` is dns (`name` asked, `answers` given), connect (`protocol`, `address`, `port`)
    or suppressed: `count` events of kind `name` the rate limit held back. `decision` is
    allowed or denied; `rule` the allowlist entry as written, or a label like "private".
    """

    seq: int
    at: datetime | None
    kind: str
    decision: str
    rule: str
    protocol: str = ""
    address: str = ""
    port: int = 0
    name: str = ""
    answers: tuple[str, ...] = ()
    count: int = 1

    @classmethod
    def from_proto(cls, event: pb.NetworkEvent) -> NetworkEvent:
        return cls(
            seq=event.seq,
            at=_time(event.at, event.HasField("at")),
            kind=event.kind,
            decision=event.decision,
            rule=event.rule,
            protocol=event.protocol,
            address=event.address,
            port=event.port,
            name=event.name,
            answers=tuple(event.answers),
            count=event.count,
        )


# -- jobs ----------------------------------------------------------------------------------

_LOG_STREAMS = {jobs_pb.LOG_STREAM_STDOUT: "stdout", jobs_pb.LOG_STREAM_STDERR: "stderr"}


def _spec_dict(message: jobs_pb.JobSpec) -> dict[str, Any]:
    """The spec as its YAML mapping; a spec this SDK cannot validate (a newer server's)
    is shown as sent rather than refused."""
    # Imported here: the spec pulls in the engine's validation, which listing sandboxes
    # (the CLI's fast path) must not load.
    from corral.jobs.spec import JobSpec, proto_to_dict

    try:
        return JobSpec.from_proto(message).to_dict()
    except InvalidRequest:
        return {k: v for k, v in proto_to_dict(message).items() if v not in ("", 0, [], {})}


@dataclass(frozen=True)
class CallbackStatus:
    """How the POSTs of a job's events to its callback URL are going."""

    url: str
    delivered: int
    pending: int
    failed: int  # gave up on these
    last_error: str

    @classmethod
    def from_proto(cls, status: jobs_pb.CallbackStatus) -> CallbackStatus:
        return cls(
            url=status.url,
            delivered=status.delivered,
            pending=status.pending,
            failed=status.failed,
            last_error=status.last_error,
        )


@dataclass(frozen=True)
class Job:
    """A job as the server last described it.

    `state` is queued, running, succeeded, failed, timed_out, canceled or lost; `spec` is
    what was submitted, as its YAML mapping (fields left out take the worker's defaults).
    """

    id: str
    state: str
    state_reason: str
    spec: dict[str, Any]
    attempt: int  # attempts started so far
    max_attempts: int
    created_at: datetime | None
    started_at: datetime | None  # of the latest attempt
    finished_at: datetime | None
    exit_code: int | None  # of the last step run
    worker: str
    log_bytes: int
    log_truncated: bool  # output past log_limit_bytes was dropped
    log_limit_bytes: int
    callback: CallbackStatus | None
    idempotency_key: str
    run_after: datetime | None = None  # queued for a retry: not before this

    @property
    def done(self) -> bool:
        """Whether it has ended (until a `retry` queues it again)."""
        return self.state in JOB_FINAL_STATES

    @classmethod
    def from_proto(cls, job: jobs_pb.Job) -> Job:
        return cls(
            id=job.id,
            state=JOB_STATE_NAMES.get(job.state, "unknown"),
            state_reason=job.state_reason,
            spec=_spec_dict(job.spec),
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            created_at=_time(job.created_at, job.HasField("created_at")),
            started_at=_time(job.started_at, job.HasField("started_at")),
            finished_at=_time(job.finished_at, job.HasField("finished_at")),
            exit_code=job.exit_code if job.HasField("exit_code") else None,
            worker=job.worker,
            log_bytes=job.log_bytes,
            log_truncated=job.log_truncated,
            log_limit_bytes=job.log_limit_bytes,
            callback=CallbackStatus.from_proto(job.callback) if job.HasField("callback") else None,
            idempotency_key=job.idempotency_key,
            run_after=_time(job.run_after, job.HasField("run_after")),
        )


@dataclass(frozen=True)
class JobSubmission:
    """What `submit` returns: the job, and whether this call created it.

    `callback_secret` keys the signature of the job's callbacks; it is given only here,
    only when the job has a callback_url and this call created it (else "").
    """

    job: Job
    callback_secret: str
    created: bool  # False: an earlier submit with the same idempotency_key made it


@dataclass(frozen=True)
class LogChunk:
    """Output of a job: `seq` counts 0, 1, 2 … across its attempts."""

    seq: int
    stream: str  # stdout | stderr
    data: bytes
    attempt: int
    step: int  # the workflow step's index; 0 otherwise
    at: datetime | None

    @classmethod
    def from_proto(cls, chunk: jobs_pb.LogChunk) -> LogChunk:
        return cls(
            seq=chunk.seq,
            stream=_LOG_STREAMS.get(chunk.stream, "stdout"),
            data=chunk.data,
            attempt=chunk.attempt,
            step=chunk.step,
            at=_time(chunk.at, chunk.HasField("at")),
        )


@dataclass(frozen=True)
class JobEvent:
    """A state change or a workflow step's start or end, in order (`seq`).

    `type` is state, step_start, step_end, log_truncated, retry_scheduled, requeued,
    callback or network; `state` is the new state of a `state` event; `data` holds the
    step's index, name, exit_code, duration_ms and the like (a `network` event's: the
    fields of a `NetworkEvent` but its seq and time).
    """

    seq: int
    type: str
    at: datetime | None
    attempt: int
    state: str
    reason: str
    data: dict[str, Any]

    @classmethod
    def from_proto(cls, event: jobs_pb.JobEvent) -> JobEvent:
        from google.protobuf.json_format import MessageToDict  # only jobs need it

        return cls(
            seq=event.seq,
            type=event.type,
            at=_time(event.at, event.HasField("at")),
            attempt=event.attempt,
            state=event.state,
            reason=event.reason,
            data=_plain_numbers(MessageToDict(event.data)),
        )


def _plain_numbers(value: Any) -> Any:
    """Struct numbers are floats; whole ones (a step index, an exit code) become ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_numbers(v) for v in value]
    return value


@dataclass(frozen=True)
class TemplateInfo:
    """A template of your team: `state` is building, ready, failed or cancelled; a
    failed one's `error` names the step that failed and ends with its log."""

    name: str
    state: str
    source: str  # dockerfile | recipe | e2b | image | debian | snapshot
    layers: tuple[str, ...]
    env: dict[str, str]
    workdir: str
    user: str
    start_cmd: str
    ready_cmd: str
    size_bytes: int
    build_job_id: str
    steps_total: int
    steps_cached: int
    error: str
    created_at: datetime | None
    updated_at: datetime | None
    # What its sandboxes and jobs get for what their request leaves unset (a None field:
    # the server's default; network None: `none`).
    sandbox_limits: Limits = Limits()
    sandbox_network: Network | None = None
    # Its memory images (a sandbox of it whose start command had run, checkpointed): a
    # create on that tier with the same options restores one instead of starting cold.
    memory_images: tuple[MemoryImageInfo, ...] = ()

    @classmethod
    def from_proto(cls, template: templates_pb.Template) -> TemplateInfo:
        return cls(
            name=template.name,
            state=TEMPLATE_STATE_NAMES.get(template.state, "building"),
            source=template.source,
            layers=tuple(template.layers),
            env=dict(template.env),
            workdir=template.workdir,
            user=template.user,
            start_cmd=template.start_cmd,
            ready_cmd=template.ready_cmd,
            size_bytes=template.size_bytes,
            build_job_id=template.build_job_id,
            steps_total=template.steps_total,
            steps_cached=template.steps_cached,
            error=template.error,
            created_at=_time(template.created_at, template.HasField("created_at")),
            updated_at=_time(template.updated_at, template.HasField("updated_at")),
            sandbox_limits=Limits(
                **{n: getattr(template.sandbox_limits, n) or None for n in REQUEST_LIMITS}
            ),
            sandbox_network=(
                Network.from_proto(template.sandbox_network)
                if template.HasField("sandbox_network")
                else None
            ),
            memory_images=tuple(
                MemoryImageInfo.from_proto(image) for image in template.memory_images
            ),
        )


@dataclass(frozen=True)
class MemoryImageInfo:
    """A template's memory image: for which tier (`isolation`), memory, CPUs, network
    mode and RAM disk its sandboxes are restored from it."""

    isolation: str
    memory_mib: int
    cpu: float
    network: str
    ram_disk: bool
    size_bytes: int
    created_at: datetime | None

    @classmethod
    def from_proto(cls, image: templates_pb.MemoryImage) -> MemoryImageInfo:
        return cls(
            isolation=image.isolation,
            memory_mib=image.memory_mib,
            cpu=image.cpu,
            network=image.network,
            ram_disk=image.ram_disk,
            size_bytes=image.size_bytes,
            created_at=_time(image.created_at, image.HasField("created_at")),
        )

    def __str__(self) -> str:
        disk = ", ram disk" if self.ram_disk else ""
        return (
            f"{self.isolation} ({self.memory_mib} MiB, {self.cpu:g} cpu, network "
            f"{self.network}{disk}; {self.size_bytes} bytes)"
        )


@dataclass(frozen=True)
class BuildLog:
    """One item of a build's progress, in order: a chunk of a step's output (`chunk`,
    with the step's `label`) or an event (`event`: step i/N, cached, pulled, state)."""

    label: str = ""
    chunk: LogChunk | None = None
    event: JobEvent | None = None

    def __str__(self) -> str:
        if self.chunk is not None:
            return self.chunk.data.decode(errors="replace")
        if self.event is not None:
            return self.event.reason or self.event.type
        return ""
