"""Resource limits of one sandbox, validated before anything is created.

A policy object shared by the SDK's job specs, the services and every isolation tier, so
it imports nothing of the engine: checking a spec's limits must not load cgroups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from corral.errors import InvalidBuild, InvalidLimits

MIB = 1024 * 1024
# Memory kept free of tmpfs storage for the agent and a command (see Limits.storage_bytes).
STORAGE_HEADROOM_MIB = 64
# The limits a request (the API's `Limits` message, a job spec, a template's defaults) sets;
# the others are the server's.
REQUEST_LIMITS = ("memory_mib", "cpu", "pids", "disk_mib", "bandwidth_mbit", "connections")

# (minimum, maximum) accepted for each limit; the maximum is a sanity bound, the host's
# own capacity is checked separately by `check_host`.
_BOUNDS: dict[str, tuple[float, float]] = {
    "memory_mib": (16, 1024 * 1024),
    "cpu": (0.01, 1024),
    "pids": (8, 1_000_000),
    "disk_mib": (1, 16 * 1024 * 1024),
    "open_files": (16, 1_048_576),
    "file_size_mib": (1, 16 * 1024 * 1024),
    "output_bytes": (1, 1 << 40),
    "bandwidth_mbit": (0, 1_000_000),
    "connections": (1, 1_000_000),
}


@dataclass(frozen=True)
class Limits:
    """Kernel-enforced limits: memory (swap off), CPU cores, processes, writable storage."""

    memory_mib: int = 512
    cpu: float = 1.0
    pids: int = 512
    # Total size of the sandbox's writable storage: /workspace, /tmp and home together.
    disk_mib: int = 1024
    open_files: int = 1024
    # Largest single file a command may write (RLIMIT_FSIZE; past it: SIGXFSZ).
    file_size_mib: int = 4096
    # Default cap on one command's stdout+stderr; a command past it ends with `output_limit`.
    output_bytes: int = 64 * MIB
    # Network (when the sandbox's policy lets it out): megabits per second each way, 0 for
    # no cap; and how many connections (TCP, or UDP flows) may be open at once.
    bandwidth_mbit: int = 0
    connections: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric or (f.type == "int" and not isinstance(value, int)):
                raise InvalidLimits(f"limit {f.name}={value!r} must be a {f.type}")
            low, high = _BOUNDS[f.name]
            if not low <= value <= high:
                raise InvalidLimits(
                    f"limit {f.name}={value!r} is out of range: use {low:g} to {high:g}"
                )

    def check_host(self) -> None:
        """Refuse limits this host cannot honour (more memory or cores than it has)."""
        total_mib = host_memory_mib()
        if self.memory_mib > total_mib:
            raise InvalidLimits(
                f"memory_mib={self.memory_mib} exceeds this host's {total_mib} MiB of memory"
            )
        cores = os.cpu_count() or 1
        if self.cpu > cores:
            raise InvalidLimits(f"cpu={self.cpu:g} exceeds this host's {cores} cores")

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def disk_bytes(self) -> int:
        return self.disk_mib * MIB

    @property
    def storage_bytes(self) -> int:
        """The size of the sandbox's tmpfs storage: the disk limit, but never so large that
        full storage leaves no memory for the guest agent and a command.

        tmpfs pages are charged to the sandbox's memory and cannot be reclaimed (no swap):
        storage as large as the memory limit lets a `dd` fill the memory, after which the
        agent itself cannot allocate and the OOM killer takes it (the sandbox is lost).
        Keeping STORAGE_HEADROOM_MIB (or half the memory, if less) free makes a full disk
        an ENOSPC the writer sees instead.
        """
        headroom = min(STORAGE_HEADROOM_MIB, self.memory_mib // 2)
        return min(self.disk_mib, self.memory_mib - headroom) * MIB


def host_memory_mib() -> int:
    """This host's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB


# A template build's context (the files COPY and ADD take) travels in the Build request,
# whose message is bounded (corral.server.requests.MAX_MESSAGE_BYTES, 8 MiB): the context
# gets most of it, the Dockerfile and the rest of the request the remainder.
BUILD_CONTEXT_MAX_BYTES = 6 * MIB


def check_build_context(size: int) -> None:
    """Refuse a build context (a tar) over the bound, saying what to do instead; the SDK
    checks before it sends, the server again for any other client."""
    if size > BUILD_CONTEXT_MAX_BYTES:
        raise InvalidBuild(
            f"the build context is {size} bytes as a tar, over the limit of "
            f"{BUILD_CONTEXT_MAX_BYTES // MIB} MiB: leave large files out (.dockerignore), "
            "or fetch them in a RUN step, or start FROM a template that has them"
        )
