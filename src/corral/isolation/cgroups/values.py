"""Cgroup values: the limits a sandbox asks for, its usage, and the controller file
writes that apply limits in each cgroup version. I/O-free, so tests check it directly."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

from corral.errors import InvalidLimits

CPU_PERIOD_US = 100_000
MIN_MEMORY_BYTES = 1 << 20
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses CFS quotas below 1 ms
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "pids")
V1_UNLIMITED = -1


@dataclass(frozen=True)
class CgroupLimits:
    """Hard limits for one sandbox; None means unlimited."""

    memory_bytes: int | None = None
    cpu_quota: float | None = None  # in cores: 0.5 is half of one CPU, 2.0 is two CPUs
    pids: int | None = None

    def __post_init__(self) -> None:
        memory, cpu, pids = self.memory_bytes, self.cpu_quota, self.pids
        if memory is not None and (not _is_int(memory) or memory < MIN_MEMORY_BYTES):
            raise InvalidLimits(f"memory limit {memory!r} must be an integer of at least 1 MiB")
        if cpu is not None and (
            isinstance(cpu, bool)
            or not isinstance(cpu, int | float)
            or not cpu * CPU_PERIOD_US >= MIN_CPU_QUOTA_US
            or cpu == float("inf")
        ):
            raise InvalidLimits(f"cpu quota {cpu!r} must be a number of cores of at least 0.01")
        if pids is not None and (not _is_int(pids) or pids < 1):
            raise InvalidLimits(f"pids limit {pids!r} must be a positive integer")

    @property
    def cpu_quota_us(self) -> int | None:
        """The CPU quota as microseconds of CPU time per `CPU_PERIOD_US`."""
        return None if self.cpu_quota is None else round(self.cpu_quota * CPU_PERIOD_US)


@dataclass(frozen=True)
class CgroupUsage:
    """What a sandbox has used so far."""

    cpu_seconds: float
    memory_bytes: int
    memory_peak_bytes: int
    pids: int
    oom_kills: int


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_keyed(text: str) -> dict[str, int]:
    """Parse the kernel's "key value" files: cpu.stat, memory.events, memory.oom_control."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        with suppress(ValueError):
            values[key] = int(value)
    return values


def v2_limit_writes(limits: CgroupLimits) -> list[tuple[str, str, bool]]:
    """The (file, value, required) writes that apply `limits` to a v2 cgroup, in order.

    Optional files are skipped where the kernel lacks them: memory.swap.max without swap
    accounting, memory.oom.group before Linux 4.19.
    """
    quota = limits.cpu_quota_us
    return [
        ("memory.max", _v2_number(limits.memory_bytes), True),
        ("memory.swap.max", "0", False),
        ("memory.oom.group", "0", False),
        ("cpu.max", f"{_v2_number(quota)} {CPU_PERIOD_US}", True),
        ("pids.max", _v2_number(limits.pids), True),
    ]


def v1_limit_writes(limits: CgroupLimits, current_memsw: int | None) -> list[tuple[str, str, str]]:
    """The (controller, file, value) writes that apply `limits` to a v1 cgroup, in order.

    `current_memsw` is memory.memsw.limit_in_bytes as it reads now, or None when the kernel
    has no swap accounting. The kernel keeps memsw >= limit at every step, so a limit
    that fits under the current memsw is written first and memsw follows; a limit above
    it needs memsw raised first.
    """
    memory = V1_UNLIMITED if limits.memory_bytes is None else limits.memory_bytes
    writes: list[tuple[str, str, str]] = []
    if current_memsw is None:
        writes += [
            ("memory", "memory.limit_in_bytes", str(memory)),
            ("memory", "memory.swappiness", "0"),
        ]
    else:
        limit = ("memory", "memory.limit_in_bytes", str(memory))
        memsw = ("memory", "memory.memsw.limit_in_bytes", str(memory))
        fits = memory != V1_UNLIMITED and memory <= current_memsw
        writes += [limit, memsw] if fits else [memsw, limit]
    quota = limits.cpu_quota_us
    writes += [
        ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
        ("cpu", "cpu.cfs_quota_us", str(V1_UNLIMITED if quota is None else quota)),
        ("pids", "pids.max", "max" if limits.pids is None else str(limits.pids)),
    ]
    return writes


def _v2_number(value: int | None) -> str:
    return "max" if value is None else str(value)
