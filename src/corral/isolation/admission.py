"""Host admission: this host promises its sandboxes no more memory than it has.

A sandbox's memory limit is a promise: with swap off, and its writable storage on a tmpfs
whose pages are charged to its own memory cgroup, it may use all of it, and the kernel
cannot take it back without killing something. So a sandbox is admitted only while the
memory limits of all the live sandboxes of the host (API, pooled, job and one-shot ones,
of every Corral process sharing the runtime dir: the server and its `corral worker`s)
fit in (physical memory - `memory_reserve_mib`) x `memory_overcommit`.

The promises are kept in a ledger every process reads, `<runtime_dir>/memory/`: one empty
file per live sandbox named `<sandbox id>.<memory MiB>.<owner pid>.<owner start time>`, so
that one directory listing is the whole ledger (no file is opened on the hot path). An
admission sums it and writes its entry under an exclusive lock on
`<runtime_dir>/memory.lock`, so two processes cannot both slip under the capacity. Entries
whose owner process is gone (even by SIGKILL) do not count, and the next admission removes
them; a sandbox's footprint records its entry, so releasing the footprint removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from corral.config import Settings
from corral.errors import CapacityExceeded, InvalidRequest
from corral.isolation.footprint import process_alive, process_start_time, try_lock
from corral.limits import host_memory_mib

# Another process holds the ledger's lock only for a listing and a file creation (tens of
# microseconds): look again this often rather than block the event loop on it, and give up
# (a process stopped while holding it) after a while.
_LOCK_POLL = 0.001
_LOCK_PATIENCE = 10.0


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


class MemoryLedger:
    """The memory promised to the live sandboxes of one runtime dir, by every process."""

    def __init__(self, runtime_dir: Path, capacity: MemoryCapacity) -> None:
        self.capacity = capacity
        self.dir = runtime_dir / "memory"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._lock_path = runtime_dir / "memory.lock"
        self._owner = f"{os.getpid()}.{process_start_time(os.getpid()) or 0}"

    def committed_mib(self, *, excluding: str | None = None, prune: bool = False) -> int:
        """The memory limits of the host's live sandboxes, but `excluding`'s; with `prune`
        (under the lock), the entries of dead owners are removed as they are met."""
        total = 0
        alive = {self._owner: True}  # one /proc read per other owner, not per sandbox
        for name in os.listdir(self.dir):
            sandbox_id, _, rest = name.partition(".")
            mib, _, owner = rest.partition(".")
            if owner not in alive:
                pid, _, start = owner.partition(".")
                alive[owner] = (
                    pid.isdigit() and start.isdigit() and process_alive(int(pid), int(start))
                )
            if not alive[owner]:
                if prune:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.dir / name)
            elif sandbox_id != excluding and mib.isdigit():
                total += int(mib)
        return total

    async def admit(self, sandbox_id: str, memory_mib: int, replacing: str | None = None) -> str:
        """Record that `sandbox_id` holds `memory_mib` if that fits (its entry `replacing`,
        if any, given back first), else raise CapacityExceeded; the new entry's path.

        The sum and the new entry happen under the lock with no await between them, so a
        cancelled caller leaves no entry behind; the lock is only waited for by polling,
        so a slow holder never blocks this process's event loop."""
        deadline = time.monotonic() + _LOCK_PATIENCE
        while True:
            with try_lock(self._lock_path, os.O_CREAT) as locked:
                if locked:
                    committed = self.committed_mib(excluding=sandbox_id, prune=True)
                    self.capacity.check(memory_mib, committed)
                    return self.record(sandbox_id, memory_mib, replacing)
            if time.monotonic() > deadline:
                raise CapacityExceeded(
                    f"could not take the host's admission lock {self._lock_path} in "
                    f"{_LOCK_PATIENCE:g} s: a Corral process holds it and seems stopped "
                    "(SIGSTOP?); continue or kill it"
                )
            await asyncio.sleep(_LOCK_POLL)

    def record(self, sandbox_id: str, memory_mib: int, replacing: str | None = None) -> str:
        """Record `sandbox_id`'s (new) memory limit with no check: `admit` checked it, or
        it gives memory back."""
        entry = f"{self.dir}/{sandbox_id}.{memory_mib}.{self._owner}"
        if replacing is not None:
            os.rename(replacing, entry)
        else:
            os.close(os.open(entry, os.O_WRONLY | os.O_CREAT, 0o600))
        return entry
