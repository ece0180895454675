"""Kernel resource limits for sandboxes: cgroup v2 and cgroup v1 behind one interface.

`CgroupDriver.detect()` reads /proc/self/mounts once per host and returns the driver that
fits it: v2 when a cgroup2 mount offers the memory, cpu and pids controllers, otherwise v1
when the v1 controller hierarchies are mounted. Each sandbox gets one cgroup named after
it, below a parent owned by Corral::

    v2   <cgroup2 mount>/corral/<name>                /sys/fs/cgroup/corral/sbx-1
    v1   <hierarchy>/corral/<name> in each hierarchy   /sys/fs/cgroup/memory/corral/sbx-1,
                                                       /sys/fs/cgroup/pids/corral/sbx-1, ...

The v2 parent sits directly under the mount rather than beside Corral's own process,
because cgroup v2 allows controllers only below cgroups without processes of their own.

Memory limits forbid swap, so a limit means RAM: v1 sets memory.memsw.limit_in_bytes equal
to memory.limit_in_bytes, v2 sets memory.swap.max to 0. A v1 kernel without swap accounting
has no memsw files; there memory.swappiness is set to 0, which stops the cgroup's own
reclaim from swapping but is not a hard limit (`describe()` says so). v2 sets
memory.oom.group to 0: on OOM the kernel kills only the biggest process, so the guest
agent survives to report the kill instead of dying with the whole sandbox.

Everything that touches the filesystem goes through `CgroupFS`, and every path is built
from the mount points the driver was given, so tests run both drivers against a fake
kernel laid out in a tmp dir; the two versions differ only in file names and formats.
"""

from __future__ import annotations

import errno
import logging
import os
import platform
import re
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import ClassVar, Literal

from corral.errors import (
    CorralError,
    InvalidLimits,
    InvalidRequest,
    IsolationUnavailable,
    SandboxError,
)

__all__ = [
    "CPU_PERIOD_US",
    "Cgroup",
    "CgroupDriver",
    "CgroupFS",
    "CgroupLimits",
    "CgroupUsage",
    "CgroupV1",
    "CgroupV1Driver",
    "CgroupV2",
    "CgroupV2Driver",
    "Mount",
    "describe",
    "parse_keyed",
    "parse_mounts",
    "v1_limit_writes",
    "v2_limit_writes",
]

logger = logging.getLogger(__name__)

MOUNTS_FILE = "/proc/self/mounts"
CPU_PERIOD_US = 100_000
MIN_MEMORY_BYTES = 1 << 20
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses CFS quotas below 1 ms
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer")
V2_CONTROLLERS = ("memory", "cpu", "pids")
V1_UNLIMITED = -1


# -- values ---------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mounts."""

    path: str
    fstype: str
    options: frozenset[str]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- I/O-free logic shared by both versions -----------------------------------------------


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/self/mounts, undoing the kernel's octal escapes (\\040 is a space)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            mounts.append(Mount(path, fields[2], frozenset(fields[3].split(","))))
    return mounts


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


def _check_name(name: str, what: str = "cgroup name") -> str:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\0" in name
        or name.startswith("cgroup.")
        or len(name) > 200
    ):
        raise InvalidRequest(
            f"{what} {name!r} is invalid: use up to 200 characters without '/' or NUL, "
            "not '.' or '..' and not starting with 'cgroup.'"
        )
    return name


def _check_parent(parent: str) -> str:
    for part in parent.split("/"):
        _check_name(part, "cgroup parent component")
    return parent


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition` with a growing sleep; True once it holds, False after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def _os_error(exc: OSError, action: str) -> CorralError:
    """Translate a failed cgroupfs call into the Corral error that says what to do."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return IsolationUnavailable(
            f"cannot {action}: {exc.strerror}; Corral needs root or a cgroup delegated to "
            "its user (run `corral doctor`)"
        )
    if exc.errno == errno.EINVAL:
        return InvalidLimits(f"the kernel refused to {action}")
    if exc.errno == errno.ENOENT:
        return IsolationUnavailable(
            f"cannot {action}: no such file; is the controller enabled? (run `corral doctor`)"
        )
    return IsolationUnavailable(f"cannot {action}: {exc.strerror}")


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


# -- the filesystem boundary ----------------------------------------------------------


class CgroupFS:
    """The only code that touches cgroupfs; tests pass a fake kernel laid out in a tmp dir."""

    def read(self, path: str) -> str:
        with open(path, encoding="utf-8") as file:
            return file.read()

    def write(self, path: str, data: str) -> None:
        # One write(2) per value, without O_CREAT: cgroupfs parses each write on its own,
        # and a missing interface file means a missing controller, not a file to create.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def subdirs(self, path: str) -> list[str]:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))


# -- one sandbox's cgroup ---------------------------------------------------------------


class Cgroup(ABC):
    """One sandbox's cgroup: one directory (v2) or one per v1 hierarchy."""

    def __init__(self, name: str, fs: CgroupFS) -> None:
        self.name = name
        self._fs = fs
        self._peak_seen = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.directories()}>"

    @abstractmethod
    def directories(self) -> list[str]:
        """Every directory of this cgroup, one per distinct hierarchy."""

    @abstractmethod
    def set_limits(self, limits: CgroupLimits) -> None:
        """Apply `limits`, replacing the current ones; None lifts a limit."""

    @abstractmethod
    def usage(self) -> CgroupUsage:
        """CPU time, memory, processes and OOM kills so far."""

    @abstractmethod
    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer has killed here; one file, for hot paths."""

    @abstractmethod
    def frozen(self) -> bool:
        """Whether every process of the cgroup is frozen."""

    @abstractmethod
    def _can_freeze(self) -> bool: ...

    @abstractmethod
    def _request_freeze(self, frozen: bool) -> None: ...

    def _kill_atomically(self) -> bool:
        """Kill the whole cgroup in one kernel call if this kernel can; False if it can't."""
        return False

    def procs_files(self) -> list[str]:
        """Every cgroup.procs a process must be written into to join this cgroup."""
        return [os.path.join(d, "cgroup.procs") for d in self.directories()]

    def join(self, pid: int) -> None:
        """Move process `pid` into this cgroup; safe to call from a `preexec_fn`."""
        for path in self.procs_files():
            self._write(path, str(pid))

    def exists(self) -> bool:
        return any(self._fs.exists(d) for d in self.directories())

    def pids(self) -> list[int]:
        """Every process in this cgroup and any cgroups nested in it."""
        found: set[int] = set()
        for top in self.directories():
            for directory in self._walk(top):
                with suppress(FileNotFoundError):
                    found.update(int(p) for p in self._fs.read(f"{directory}/cgroup.procs").split())
        return sorted(found)

    def freeze(self, timeout: float = 5.0) -> None:
        """Stop every process, and return once all of them are stopped."""
        self._set_frozen(True, timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        """Let the processes run again."""
        self._set_frozen(False, timeout)

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process and return once the cgroup is empty, fork bombs included.

        With cgroup.kill (v2, Linux 5.14+) the kernel does it in one step. Otherwise each
        round freezes the cgroup so nothing can fork or exit (and so no pid is recycled),
        signals every pid, and thaws so the signals take effect; rounds repeat until empty.
        """
        if not self.exists():
            return
        deadline = time.monotonic() + timeout
        if self._kill_atomically() and _wait_until(lambda: not self.pids(), timeout):
            return
        while self.pids():
            if time.monotonic() >= deadline:
                raise SandboxError(
                    f"cgroup {self.name!r} still has processes {self.pids()[:10]} after "
                    f"{timeout:g} s of SIGKILL; they may be stuck in the kernel (state D)"
                )
            self._kill_round()
            _wait_until(lambda: not self.pids(), 0.1)

    def destroy(self, timeout: float = 5.0) -> None:
        """Kill every process and remove every directory; does nothing once destroyed."""
        if not self.exists():
            return
        self.kill_all()
        deadline = time.monotonic() + timeout
        for top in self.directories():
            for directory in reversed(list(self._walk(top))):
                self._rmdir(directory, deadline)
        logger.debug("destroyed cgroup", extra={"cgroup": self.name})

    # -- helpers shared by both versions

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        if not self._can_freeze():
            raise IsolationUnavailable(f"cgroup {self.name!r} has no freezer (run `corral doctor`)")
        self._request_freeze(frozen)
        if not _wait_until(lambda: self.frozen() == frozen, timeout):
            verb = "freeze" if frozen else "thaw"
            raise SandboxError(f"cgroup {self.name!r} did not {verb} within {timeout:g} s")

    def _kill_round(self) -> None:
        if not self._can_freeze():
            self._kill_unfrozen()
            return
        try:
            self.freeze(timeout=1.0)
        except SandboxError:
            # A task stuck in the kernel keeps the cgroup FREEZING: kill what can die.
            self._kill_unfrozen()
        else:
            for pid in self.pids():
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            self.thaw()

    def _kill_unfrozen(self) -> None:
        """Signal through pidfds, re-checking membership after opening them, so a pid
        recycled by a process outside the sandbox is never hit."""
        pids = self.pids()
        for start in range(0, len(pids), 256):
            pidfds: dict[int, int] = {}
            try:
                for pid in pids[start : start + 256]:
                    try:
                        pidfds[pid] = os.pidfd_open(pid)
                    except ProcessLookupError:
                        continue
                    except OSError:  # no pidfd before Linux 5.3: accept the small race
                        with suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                members = set(self.pids())
                for pid, pidfd in pidfds.items():
                    if pid in members:
                        with suppress(ProcessLookupError):
                            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                for pidfd in pidfds.values():
                    os.close(pidfd)

    def _rmdir(self, directory: str, deadline: float) -> None:
        while True:
            try:
                self._fs.rmdir(directory)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise _os_error(exc, f"remove {directory}") from exc
                if time.monotonic() >= deadline:
                    raise SandboxError(
                        f"cannot remove {directory}: still busy; processes: {self.pids()[:10]}"
                    ) from exc
            # A process that was exiting, or one that slipped in late, holds it briefly.
            self.kill_all()
            time.sleep(0.02)

    def _walk(self, top: str) -> Iterator[str]:
        """`top` and every cgroup nested in it, parents first; nothing if `top` is gone."""
        try:
            children = self._fs.subdirs(top)
        except FileNotFoundError:
            return
        yield top
        for child in children:
            yield from self._walk(os.path.join(top, child))

    def _read(self, path: str) -> str:
        try:
            return self._fs.read(path)
        except OSError as exc:
            if not self.exists():
                raise SandboxError(f"cgroup {self.name!r} no longer exists") from exc
            raise _os_error(exc, f"read {path}") from exc

    def _read_optional(self, path: str) -> str | None:
        return self._read(path) if self._fs.exists(path) else None

    def _write(self, path: str, value: str) -> None:
        try:
            self._fs.write(path, value)
        except OSError as exc:
            raise _os_error(exc, f"write {value!r} to {path}") from exc


class CgroupV2(Cgroup):
    """A sandbox cgroup in the unified (v2) hierarchy."""

    def __init__(self, name: str, path: str, fs: CgroupFS) -> None:
        super().__init__(name, fs)
        self.path = path

    def directories(self) -> list[str]:
        return [self.path]

    def set_limits(self, limits: CgroupLimits) -> None:
        for file, value, required in v2_limit_writes(limits):
            path = os.path.join(self.path, file)
            if required or self._fs.exists(path):
                self._write(path, value)

    def usage(self) -> CgroupUsage:
        cpu = parse_keyed(self._read(self._file("cpu.stat"))).get("usage_usec", 0)
        memory = int(self._read(self._file("memory.current")))
        peak_text = self._read_optional(self._file("memory.peak"))  # Linux 5.19+
        self._peak_seen = max(self._peak_seen, memory)
        pids_text = self._read_optional(self._file("pids.current"))
        return CgroupUsage(
            cpu_seconds=cpu / 1e6,
            memory_bytes=memory,
            memory_peak_bytes=int(peak_text) if peak_text is not None else self._peak_seen,
            pids=int(pids_text) if pids_text is not None else len(self.pids()),
            oom_kills=self.oom_kills(),
        )

    def oom_kills(self) -> int:
        return parse_keyed(self._read(self._file("memory.events"))).get("oom_kill", 0)

    def frozen(self) -> bool:
        return parse_keyed(self._read(self._file("cgroup.events"))).get("frozen") == 1

    def _can_freeze(self) -> bool:
        return self._fs.exists(self._file("cgroup.freeze"))  # Linux 5.2+

    def _request_freeze(self, frozen: bool) -> None:
        self._write(self._file("cgroup.freeze"), "1" if frozen else "0")

    def _kill_atomically(self) -> bool:
        if not self._fs.exists(self._file("cgroup.kill")):  # Linux 5.14+
            return False
        self._write(self._file("cgroup.kill"), "1")
        return True

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)


class CgroupV1(Cgroup):
    """A sandbox cgroup in v1: a directory of the same name in each controller hierarchy."""

    def __init__(self, name: str, paths: Mapping[str, str], fs: CgroupFS) -> None:
        super().__init__(name, fs)
        self.paths = dict(paths)  # controller -> directory; co-mounted controllers share one

    def directories(self) -> list[str]:
        return list(dict.fromkeys(self.paths.values()))

    def set_limits(self, limits: CgroupLimits) -> None:
        memsw = self._file("memory", "memory.memsw.limit_in_bytes")
        current = self._read_optional(memsw)
        for controller, file, value in v1_limit_writes(limits, _int_or_none(current)):
            self._write(self._file(controller, file), value)

    def usage(self) -> CgroupUsage:
        return CgroupUsage(
            cpu_seconds=int(self._read(self._file("cpuacct", "cpuacct.usage"))) / 1e9,
            memory_bytes=int(self._read(self._file("memory", "memory.usage_in_bytes"))),
            memory_peak_bytes=int(self._read(self._file("memory", "memory.max_usage_in_bytes"))),
            pids=int(self._read(self._file("pids", "pids.current"))),
            oom_kills=self.oom_kills(),
        )

    def oom_kills(self) -> int:
        # memory.oom_control reports oom_kill from Linux 4.13 on.
        control = parse_keyed(self._read(self._file("memory", "memory.oom_control")))
        return control.get("oom_kill", 0)

    def frozen(self) -> bool:
        # Reading freezer.state is also what moves FREEZING on to FROZEN.
        return self._read(self._file("freezer", "freezer.state")).strip() == "FROZEN"

    def _can_freeze(self) -> bool:
        return "freezer" in self.paths

    def _request_freeze(self, frozen: bool) -> None:
        self._write(self._file("freezer", "freezer.state"), "FROZEN" if frozen else "THAWED")

    def _file(self, controller: str, name: str) -> str:
        try:
            return os.path.join(self.paths[controller], name)
        except KeyError:
            raise IsolationUnavailable(
                f"the v1 {controller} controller is not mounted (run `corral doctor`)"
            ) from None


def _int_or_none(text: str | None) -> int | None:
    return None if text is None else int(text)


# -- drivers: one per host ----------------------------------------------------------------


class CgroupDriver(ABC):
    """Creates and finds sandbox cgroups below Corral's parent cgroup on one host."""

    version: ClassVar[Literal[1, 2]]

    def __init__(self, parent: str, fs: CgroupFS | None) -> None:
        self.parent = _check_parent(parent)
        self._fs = fs or CgroupFS()

    @classmethod
    def detect(
        cls,
        parent: str = "corral",
        *,
        mounts_file: str = MOUNTS_FILE,
        root: str = "/",
        fs: CgroupFS | None = None,
    ) -> CgroupDriver:
        """The driver for this host, from the cgroup mounts listed in `mounts_file`.

        Mount points are looked up below `root`, so a tmp dir laid out like / stands in
        for the host in tests. Called on `CgroupV1Driver` or `CgroupV2Driver`, only that
        version is considered. Raises IsolationUnavailable naming what is missing.
        """
        v2, v1 = _find_drivers(parent, mounts_file, root, fs or CgroupFS())
        driver: CgroupDriver | None
        if cls is CgroupV2Driver:
            driver = v2
        elif cls is CgroupV1Driver:
            driver = v1
        else:
            driver = _choose(v2, v1)
        if driver is None:
            raise IsolationUnavailable(
                f"no cgroup hierarchy is mounted (read {mounts_file}): mount cgroup v2 with "
                "`mount -t cgroup2 none /sys/fs/cgroup`"
            )
        if missing := driver.missing():
            raise IsolationUnavailable(driver.explain(missing))
        return driver

    @abstractmethod
    def missing(self) -> list[str]:
        """The controllers sandboxes need (memory, cpu, pids, freezer …) that are absent."""

    @abstractmethod
    def mount_points(self) -> dict[str, str]:
        """Controller (or "unified" for v2) -> where its hierarchy is mounted."""

    @abstractmethod
    def hint(self, controller: str) -> str:
        """How to make `controller` available."""

    @abstractmethod
    def notes(self) -> list[str]:
        """Caveats of this host for a doctor report."""

    @abstractmethod
    def _cgroup(self, name: str) -> Cgroup: ...

    @abstractmethod
    def _roots(self) -> list[str]:
        """The mount point of each distinct hierarchy used."""

    def _parent_dirs(self) -> list[str]:
        return [os.path.join(root, self.parent) for root in self._roots()]

    @abstractmethod
    def _ensure_parent(self) -> None: ...

    def explain(self, missing: list[str]) -> str:
        hints = "; ".join(self.hint(c) for c in missing)
        return f"cgroup v{self.version} lacks {', '.join(missing)}: {hints}"

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        """Create the cgroup for sandbox `name` with `limits`; it must not exist yet."""
        cgroup = self._cgroup(_check_name(name))
        if missing := self.missing():
            raise IsolationUnavailable(self.explain(missing))
        self._ensure_parent()
        if cgroup.exists():
            raise InvalidRequest(f"cgroup {name!r} already exists; destroy it first")
        created = False
        try:
            for directory in cgroup.directories():
                self._mkdir(directory)
                created = True
            cgroup.set_limits(limits)
        except BaseException:
            if created:  # never tear down a cgroup another caller raced us to create
                with suppress(CorralError):
                    cgroup.destroy()
            raise
        logger.debug("created cgroup", extra={"cgroup": name, "limits": limits})
        return cgroup

    def open(self, name: str) -> Cgroup | None:
        """The existing cgroup of sandbox `name`, or None."""
        cgroup = self._cgroup(_check_name(name))
        return cgroup if cgroup.exists() else None

    def remove_parent(self) -> None:
        """Remove Corral's empty parent cgroup (tests, uninstall); no-op when absent."""
        if names := self.list():
            raise InvalidRequest(f"sandbox cgroups remain under {self.parent!r}: {names[:10]}")
        parts = self.parent.split("/")
        for root in self._roots():
            for depth in range(len(parts), 0, -1):
                path = os.path.join(root, *parts[:depth])
                try:
                    self._fs.rmdir(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        break  # an ancestor that holds other cgroups too
                    raise _os_error(exc, f"remove {path}") from exc

    def describe(self) -> dict[str, object]:
        """Version, mount points and controllers for a doctor report."""
        missing = self.missing()
        return {
            "version": self.version,
            "parent": self.parent,
            "mounts": self.mount_points(),
            "available": [c for c in self._wanted() if c not in missing],
            "missing": missing,
            "hints": [self.hint(c) for c in missing],
            "notes": self.notes(),
        }

    def _wanted(self) -> tuple[str, ...]:
        return (*V2_CONTROLLERS, "freezer") if self.version == 2 else V1_CONTROLLERS

    def _mkdir(self, path: str, exist_ok: bool = False) -> None:
        try:
            self._fs.mkdir(path)
        except FileExistsError:
            if not exist_ok:
                raise InvalidRequest(f"cgroup {path} already exists; destroy it first") from None
        except OSError as exc:
            raise _os_error(exc, f"create {path}") from exc

    # Defined last: inside the class body the name `list` is this method from here on.
    def list(self) -> list[str]:
        """Names of the sandbox cgroups under Corral's parent (the reaper walks these)."""
        names: set[str] = set()
        for directory in self._parent_dirs():
            with suppress(FileNotFoundError):
                names.update(self._fs.subdirs(directory))
        return sorted(names)


class CgroupV2Driver(CgroupDriver):
    """Sandbox cgroups in the unified hierarchy: `<mount>/<parent>/<name>`."""

    version = 2

    def __init__(
        self, mount: str = "/sys/fs/cgroup", parent: str = "corral", fs: CgroupFS | None = None
    ) -> None:
        super().__init__(parent, fs)
        self.mount = mount

    def controllers(self) -> set[str]:
        """The controllers this hierarchy offers (its root's cgroup.controllers)."""
        try:
            return set(self._fs.read(os.path.join(self.mount, "cgroup.controllers")).split())
        except OSError:
            return set()

    def missing(self) -> list[str]:
        offered = self.controllers()
        missing = [c for c in V2_CONTROLLERS if c not in offered]
        if not self._probe("cgroup.freeze", since=(5, 2)):
            missing.append("freezer")
        return missing

    def mount_points(self) -> dict[str, str]:
        return {"unified": self.mount}

    def hint(self, controller: str) -> str:
        if controller == "freezer":
            return "freezing cgroup v2 needs Linux 5.2 or later"
        return (
            f"enable cgroup v2 delegation of {controller}: it is not in "
            f"{self.mount}/cgroup.controllers; if it is bound to a v1 hierarchy boot with "
            "systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all, in a container run with "
            "--cgroupns=private, under systemd set Delegate=yes"
        )

    def notes(self) -> list[str]:
        notes = []
        if not self._probe("cgroup.kill", since=(5, 14)):
            notes.append("no cgroup.kill (Linux < 5.14): kill_all freezes and signals instead")
        if not self._probe("memory.peak", since=(5, 19)):
            notes.append("no memory.peak (Linux < 5.19): the peak is the highest usage seen")
        return notes

    def _probe(self, file: str, since: tuple[int, int]) -> bool:
        """Whether non-root cgroups have `file`: the root lacks most of them, so look in
        our parent or any child of the root, and go by the kernel version if there is none."""
        parent = os.path.join(self.mount, self.parent)
        if self._fs.exists(parent):
            return self._fs.exists(os.path.join(parent, file))
        with suppress(OSError):
            for child in self._fs.subdirs(self.mount):
                return self._fs.exists(os.path.join(self.mount, child, file))
        return _kernel_at_least(*since)

    def _cgroup(self, name: str) -> Cgroup:
        return CgroupV2(name, os.path.join(self.mount, self.parent, name), self._fs)

    def _roots(self) -> list[str]:
        return [self.mount]

    def _ensure_parent(self) -> None:
        # Controllers reach a cgroup only if every ancestor enabled them for its children.
        path = self.mount
        for part in ["", *self.parent.split("/")]:
            if part:
                path = os.path.join(path, part)
                self._mkdir(path, exist_ok=True)
            self._enable_controllers(path)

    def _enable_controllers(self, path: str) -> None:
        control = os.path.join(path, "cgroup.subtree_control")
        enabled = set(self._fs.read(control).split())
        wanted = [c for c in V2_CONTROLLERS if c not in enabled]
        if not wanted:
            return
        try:
            self._fs.write(control, " ".join(f"+{c}" for c in wanted))
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise _os_error(exc, f"enable {wanted} in {control}") from exc
            raise IsolationUnavailable(
                f"cannot enable {wanted} in {control}: {path} has processes of its own, and "
                "cgroup v2 allows no controllers below a cgroup with processes; move them to "
                f"a leaf (mkdir {path}/init and write each pid of {path}/cgroup.procs into "
                f"{path}/init/cgroup.procs) or give Corral a delegated cgroup as its parent"
            ) from exc


class CgroupV1Driver(CgroupDriver):
    """Sandbox cgroups in the v1 hierarchies: `<hierarchy>/<parent>/<name>` in each."""

    version = 1

    def __init__(
        self, hierarchies: Mapping[str, str], parent: str = "corral", fs: CgroupFS | None = None
    ) -> None:
        super().__init__(parent, fs)
        # controller -> mount point; co-mounted controllers ("cpu,cpuacct") share one
        self.hierarchies = {c: p for c, p in hierarchies.items() if c in V1_CONTROLLERS}

    def missing(self) -> list[str]:
        return [c for c in V1_CONTROLLERS if c not in self.hierarchies]

    def mount_points(self) -> dict[str, str]:
        return dict(self.hierarchies)

    def hint(self, controller: str) -> str:
        return (
            f"mount the v1 {controller} controller: mkdir -p /sys/fs/cgroup/{controller} && "
            f"mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}"
        )

    def swap_accounting(self) -> bool:
        memory = self.hierarchies.get("memory")
        return memory is not None and self._fs.exists(f"{memory}/memory.memsw.limit_in_bytes")

    def notes(self) -> list[str]:
        if "memory" not in self.hierarchies or self.swap_accounting():
            return []
        return [
            "no swap accounting (memory.memsw.* absent): memory limits set "
            "memory.swappiness=0, which is not a hard limit on swap; boot with "
            "swapaccount=1 or keep swap off"
        ]

    def _cgroup(self, name: str) -> Cgroup:
        paths = {c: os.path.join(p, self.parent, name) for c, p in self.hierarchies.items()}
        return CgroupV1(name, paths, self._fs)

    def _roots(self) -> list[str]:
        return list(dict.fromkeys(self.hierarchies.values()))

    def _ensure_parent(self) -> None:
        for root in self._roots():
            path = root
            for part in self.parent.split("/"):
                path = os.path.join(path, part)
                self._mkdir(path, exist_ok=True)
        # Before Linux 5.16 a memory cgroup may count only its own processes; sandboxes
        # below it must count towards it, and the flag is settable only while childless.
        memory = os.path.join(self.hierarchies["memory"], self.parent, "memory.use_hierarchy")
        if self._fs.exists(memory) and self._fs.read(memory).strip() == "0":
            try:
                self._fs.write(memory, "1")
            except OSError as exc:
                raise _os_error(exc, f"write 1 to {memory}") from exc


def _find_drivers(
    parent: str, mounts_file: str, root: str, fs: CgroupFS
) -> tuple[CgroupV2Driver | None, CgroupV1Driver | None]:
    """The best cgroup2 mount and the v1 hierarchies listed in `mounts_file`."""
    try:
        mounts = parse_mounts(fs.read(mounts_file))
    except OSError as exc:
        raise IsolationUnavailable(f"cannot read {mounts_file}: {exc.strerror}") from exc
    v2: CgroupV2Driver | None = None
    hierarchies: dict[str, str] = {}
    for mount in mounts:
        path = os.path.join(root, mount.path.lstrip("/"))
        if mount.fstype == "cgroup2":
            found = CgroupV2Driver(path, parent, fs)
            if v2 is None or len(found.controllers()) > len(v2.controllers()):
                v2 = found
        elif mount.fstype == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in mount.options:
                    hierarchies.setdefault(controller, path)
    return v2, CgroupV1Driver(hierarchies, parent, fs) if hierarchies else None


def _choose(v2: CgroupV2Driver | None, v1: CgroupV1Driver | None) -> CgroupDriver | None:
    """v2 when its hierarchy offers every controller, else v1 when mounted, else v2."""
    if v2 is not None and set(V2_CONTROLLERS) <= v2.controllers():
        return v2
    return v1 or v2


def describe(
    parent: str = "corral", *, mounts_file: str = MOUNTS_FILE, root: str = "/"
) -> dict[str, object]:
    """What cgroup support this host has, for `corral doctor`; never raises."""
    try:
        v2, v1 = _find_drivers(parent, mounts_file, root, CgroupFS())
    except IsolationUnavailable as exc:
        return {"version": None, "error": str(exc)}
    driver = _choose(v2, v1)
    if driver is None:
        return {"version": None, "error": "no cgroup hierarchy is mounted"}
    report = driver.describe()
    if v2 is not None and driver is not v2:
        report["cgroup2"] = {"mount": v2.mount, "controllers": sorted(v2.controllers())}
    return report
