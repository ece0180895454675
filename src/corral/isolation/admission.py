"""Host admission: this host promises its sandboxes no more memory than it has.

A sandbox's memory limit is a promise: with swap off, and its writable storage on a tmpfs
whose pages are charged to its own memory cgroup, it may use all of it, and the kernel
cannot take it back without killing something. So an engine admits a sandbox only while
the memory limits of all its live sandboxes (API, pooled, job and one-shot ones) fit in
(physical memory - `memory_reserve_mib`) x `memory_overcommit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from corral.config import Settings
from corral.errors import CapacityExceeded, InvalidRequest
from corral.isolation.limits import host_memory_mib


@dataclass(frozen=True)
class MemoryCapacity:
    """The memory this host may commit to sandboxes, and how that figure was reached."""

    physical_mib: int
    reserve_mib: int
    overcommit: float

    @classmethod
    def of_host(cls, settings: Settings) -> MemoryCapacity:
        """This host's capacity under `settings`; a setting that leaves none is refused."""
        ratio, reserve = settings.memory_overcommit, settings.memory_reserve_mib
        if not isinstance(ratio, int | float) or not math.isfinite(ratio) or ratio <= 0:
            raise InvalidRequest(
                f"CORRAL_MEMORY_OVERCOMMIT={ratio!r} must be a number above 0 "
                "(1.0: never promise sandboxes more memory than the host has)"
            )
        physical = host_memory_mib()
        if not isinstance(reserve, int) or not 0 <= reserve < physical:
            raise InvalidRequest(
                f"CORRAL_MEMORY_RESERVE_MIB={reserve!r} must be an integer from 0 to "
                f"{physical - 1} (this host has {physical} MiB)"
            )
        return cls(physical, reserve, float(ratio))

    @property
    def mib(self) -> int:
        return int((self.physical_mib - self.reserve_mib) * self.overcommit)

    def describe(self) -> str:
        return (
            f"{self.mib} MiB = (physical {self.physical_mib} MiB - reserve "
            f"{self.reserve_mib} MiB) x overcommit {self.overcommit:g}"
        )

    def check(self, asked_mib: int, committed_mib: int) -> None:
        """Refuse `asked_mib` more when `committed_mib` are promised already."""
        if committed_mib + asked_mib <= self.mib:
            return
        raise CapacityExceeded(
            f"this host cannot hold a sandbox of memory_mib={asked_mib}: its live sandboxes "
            f"hold {committed_mib} MiB of its capacity of {self.describe()}. Ask for less "
            "memory, end sandboxes, or (knowing the risk: no swap) raise "
            "CORRAL_MEMORY_OVERCOMMIT or lower CORRAL_MEMORY_RESERVE_MIB"
        )
