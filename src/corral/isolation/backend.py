"""The seam between the sandbox lifecycle and the isolation tiers.

A backend turns a `SandboxSpec` into a `LaunchPlan`: the argv that starts the guest agent
(or, for a one-shot sandbox, the caller's `Entrypoint` in its place) inside its
isolation, the host identity it runs as, and the workdir the agent sees.
Everything common to all tiers — the footprint record, cgroups, rlimits, the guest agent
connection, pause/resume/destroy — lives in `corral.isolation.sandbox` (commands in
`corral.isolation.command`), once.

Memory snapshots (a tier with `memory_snapshots`): `Backend.checkpoint` writes a live
sandbox whole (memory, processes, writable filesystem) into a directory, and a plan for
a spec with `restore` starts the sandbox from such a directory instead of booting it.
`Sandbox.checkpoint` and `Engine.create(restore=...)` are the callers.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from corral.config import Settings
from corral.errors import InvalidRequest, IsolationUnavailable
from corral.isolation.cgroups import CgroupLimits
from corral.isolation.footprint import Footprint
from corral.isolation.templates import LayerTemplate
from corral.isolation.volumes import VolumeMount, check_mounts
from corral.limits import Limits
from corral.network.policy import NetworkPolicy

# A command's timeout is a day at most: the guest agent waits in poll(), whose timeout is
# milliseconds in a C int, and a timeout past ~24.8 days overflowed it and killed the agent.
MAX_COMMAND_TIMEOUT = 24 * 3600


def check_command_timeout(seconds: float | None, name: str = "timeout") -> float | None:
    """`seconds` if it is a usable timeout for a command (None: no timeout)."""
    if seconds is None:
        return None
    # `not 0 < x <= max` also refuses NaN and infinity.
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds <= MAX_COMMAND_TIMEOUT
    ):
        raise InvalidRequest(
            f"{name} must be positive and at most {MAX_COMMAND_TIMEOUT} seconds (24 hours), "
            f"got {seconds!r}; leave it out (0) for no timeout"
        )
    return seconds


@dataclass(frozen=True)
class SandboxSpec:
    """What a caller asks for: a template, limits, a network policy and environment."""

    template: str = "host"
    limits: Limits = field(default_factory=Limits)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    env: Mapping[str, str] = field(default_factory=dict)
    # The layer template `template` names (the engine resolves it); None for `host`.
    rootfs: LayerTemplate | None = None
    # Named volumes mounted at paths of the sandbox (`corral.isolation.volumes`).
    volumes: tuple[VolumeMount, ...] = ()
    # A layer template's writable layer on a tmpfs (its writes count against its memory)
    # instead of a disk; a `host` sandbox's storage is a tmpfs anyway.
    ram_disk: bool = False
    # A checkpoint (`Backend.checkpoint`'s directory) to restore instead of booting: the
    # sandbox goes on where it was checkpointed, processes and files, with a new agent
    # connection. Only on a tier with `memory_snapshots`; the caller keeps the directory.
    restore: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ram_disk, bool):
            raise InvalidRequest(f"ram_disk={self.ram_disk!r}: use True or False")
        if not isinstance(self.network, NetworkPolicy):
            raise InvalidRequest(f"network must be a NetworkPolicy, got {self.network!r}")
        _check_env(self.env)
        object.__setattr__(self, "volumes", check_mounts(self.volumes))


def _check_env(env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidRequest(f"environment entries must be strings, got {key!r}={value!r}")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidRequest(
                f"environment variable name {key!r} is invalid: no '=', no NUL, not empty"
            )


@dataclass(frozen=True)
class SeedFile:
    """A file placed in a one-shot sandbox before its command starts."""

    path: str  # absolute, as the sandbox sees it
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Entrypoint:
    """The one command of a one-shot sandbox, started in place of the guest agent.

    The sandbox lives as long as the command: it has no agent, so no exec and no file
    operations, and costs a third less to start (no interpreter for the agent). Its
    isolation is the same as any sandbox's of its tier. `timeout` is kept by the host.
    """

    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None  # created when missing; the tier's workdir when None
    files: Sequence[SeedFile] = ()
    timeout: float | None = None
    # stdout+stderr bytes before it is killed ("output_limit"); the sandbox's limit if None.
    output_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) and "\0" not in a for a in self.argv):
            raise InvalidRequest("an entrypoint needs a command: a list of strings without NUL")
        _check_env(self.env)
        for path in [f.path for f in self.files] + ([self.cwd] if self.cwd else []):
            if not path.startswith("/") or "\0" in path:
                raise InvalidRequest(f"{path!r} must be an absolute path in the sandbox")
        check_command_timeout(self.timeout)
        if self.output_limit is not None and self.output_limit <= 0:
            raise InvalidRequest(f"output_limit must be positive, got {self.output_limit}")


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do on this host, and what to install or change when it can't."""

    backend: str
    available: bool
    missing: tuple[str, ...] = ()
    details: Mapping[str, object] = field(default_factory=dict)


@dataclass
class LaunchPlan:
    """How to start the guest agent (or an entrypoint) for one sandbox."""

    argv: list[str]
    env: dict[str, str]
    # The agent's view of its working directory and user.
    workdir: str
    # Host identity to drop to before exec; None keeps the caller's.
    uid: int | None = None
    gid: int | None = None
    # File descriptors the launcher inherits (e.g. the seccomp program); closed after spawn.
    pass_fds: tuple[int, ...] = ()
    # Working directory of the launcher on the host, when the tier has no chroot of its own.
    host_cwd: str | None = None
    # What the launcher writes to stderr (then exits 1) when it cannot exec an entrypoint.
    exec_failure: bytes | None = None
    # The network namespace (a bind-mounted nsfs file) the launcher joins before exec.
    netns: str | None = None
    # Where an entrypoint's signals go when its command is no host process (a microVM's
    # guest): a FIFO taking `SIGNUM GROUP` lines.
    signal_fifo: str | None = None
    # Without root, the user namespace that owns `netns`, joined with it.
    userns: str | None = None
    # False: the launcher keeps the server's open-files and file-size rlimits, for a tier
    # that holds its guest to `Limits.open_files` and `file_size_mib` itself (gVisor's
    # sentry needs host files and a memory file of its own, larger than the guest's).
    host_rlimits: bool = True


class Backend(ABC):
    """One isolation tier. Subclasses are registered by name in `registry`."""

    name: ClassVar[str]
    # Whether `plan` can start an `Entrypoint` in place of the agent.
    entrypoints: ClassVar[bool] = False
    # Whether `plan` can start a sandbox of a layer template (`SandboxSpec.rootfs`).
    layer_templates: ClassVar[bool] = False
    # Whether `plan` mounts the spec's volumes.
    volumes: ClassVar[bool] = False
    # Whether `checkpoint` works and `plan` honours `SandboxSpec.restore`.
    memory_snapshots: ClassVar[bool] = False
    # Whether `plan` can start a sandbox of the `host` template (the host's /usr).
    host_template: ClassVar[bool] = True
    # How long the guest agent has to answer its first ping (a microVM boots a kernel).
    start_timeout: ClassVar[float] = 30.0

    def cgroup_memory_bytes(self, limits: Limits) -> int:
        """The memory limit of a sandbox's cgroup: `limits.memory_bytes`, plus what the
        tier's own processes need beside the sandbox's code (a VMM) where it has them."""
        return limits.memory_bytes

    def network_modes(self) -> frozenset[str]:
        """The network modes (`NetworkPolicy.mode`) this tier can enforce on this host."""
        return frozenset({"none"})

    def check_network(self, policy: NetworkPolicy) -> None:
        """Raise IsolationUnavailable unless this tier can enforce `policy` here."""
        modes = self.network_modes()
        if policy.mode not in modes:
            raise IsolationUnavailable(
                f"the {self.name} tier cannot enforce network mode {policy.mode!r} "
                f"on this host (it can: {', '.join(sorted(modes))}); "
                "`corral doctor` says what to install"
            )

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def cgroup_limits(self, limits: Limits) -> CgroupLimits:
        """What the sandbox's host cgroup holds it to, for `limits`: the same, on a tier
        whose guest processes are host processes (plus its VMM's memory, if it has one)."""
        return CgroupLimits(
            memory_bytes=self.cgroup_memory_bytes(limits), cpu_quota=limits.cpu, pids=limits.pids
        )

    @classmethod
    @abstractmethod
    def probe(cls, settings: Settings) -> Capabilities:
        """Say whether this tier works here; cheap enough to call at start-up."""

    @abstractmethod
    def plan(
        self, footprint: Footprint, spec: SandboxSpec, entrypoint: Entrypoint | None = None
    ) -> LaunchPlan:
        """Prepare the host side of a sandbox (recorded in `footprint`) and say how to start it.

        With `entrypoint` (only when `entrypoints` is true), the plan starts that command
        where it would start the agent, with the same isolation.
        """

    def check_checkpoint(self, spec: SandboxSpec, what: str) -> None:
        """Raise IsolationUnavailable, saying `what` was asked, unless a sandbox of `spec`
        can be checkpointed (and so restored) on this tier; checked before anything of
        the sandbox changes. A tier with `memory_snapshots` that cannot checkpoint some
        sandboxes (a network it cannot save, say) refuses those here."""
        if not self.memory_snapshots:
            raise IsolationUnavailable(
                f"the {self.name} tier has no memory snapshots, so it cannot {what}; "
                "use a tier that has them (gvisor, microvm: `corral doctor` lists them)"
            )

    def checkpoint(self, footprint: Footprint, image: Path) -> None:
        """Write the live sandbox of `footprint` whole into `image` (an empty directory the
        caller made): its memory, processes and writable filesystem, and whatever else
        `plan` needs to restore it on this host (`SandboxSpec.restore`).

        Run in a thread, after the guest agent has let go of every call (`detach`), with
        the sandbox running (not frozen). On success nothing of the sandbox runs any more
        (its launcher exits); the caller then destroys it, which releases the footprint.
        On failure, raise (CorralError). `check_checkpoint` has passed for its spec.
        Only tiers with `memory_snapshots` override this.
        """
        raise IsolationUnavailable(f"the {self.name} tier has no memory snapshots")

    def attach_network(self, footprint: Footprint) -> None:  # noqa: B027 - most need none
        """Called in a thread once the sandbox's network namespace (`footprint.netns`) is
        made with its rules, before its launcher starts: a tier whose guest needs a
        device of its own there (microvm's tap) makes it, inside that namespace."""

    def host_reaches_ports(self, footprint: Footprint) -> bool:
        """Whether the host reaches the sandbox's ports in the network namespace of its
        launcher's child; else `Sandbox.open_port` asks the guest agent to connect."""
        return True

    def start_failure_detail(self, footprint: Footprint) -> str:
        """What the tier knows of why a sandbox's agent did not answer (e.g. a guest
        kernel's console), beside its launcher's stderr; "" when nothing."""
        return ""

    def clock_command(self) -> list[str] | None:
        """A command the sandbox runs as root once restored from a checkpoint, setting a
        guest kernel's clock, which stood still while the sandbox was on disk (made when
        called: it names the time); None where the guest reads the host's clock."""
        return None

    def identity_command(self, hostname: str) -> list[str] | None:
        """A command the sandbox runs as root once restored from a checkpoint, naming it
        `hostname` where its guest kernel kept the name of the sandbox checkpointed (a
        checkpoint restored into a new sandbox: a memory template); None where the host
        gives it its names afresh, or nothing in it may change the kernel's."""
        return None

    def snapshot_flush(self) -> list[str] | None:
        """A command the sandbox runs as root before a snapshot reads its files, when they
        may still be in a guest kernel's cache (`sync`); None: they are the host's."""
        return None

    @contextlib.contextmanager
    def snapshot_files(self, footprint: Footprint) -> Iterator[None]:
        """Held while the host reads a frozen sandbox's changes (`rootfs.upper_dir`): a
        tier whose disk is not mounted on the host mounts it here, read-only."""
        yield

    def close(self) -> None:  # noqa: B027 - most tiers hold nothing between sandboxes
        """Release what the tier holds for all its sandboxes, once they are destroyed."""
