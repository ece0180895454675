"""One sandbox's cgroup, and `CgroupFS`, the only code that touches cgroupfs.

What both versions share lives here: joining, listing pids, freezing, killing every
process (fork bombs included) and removal; `v2` and `v1` supply files and formats.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import suppress

from corral.errors import CorralError, InvalidLimits, IsolationUnavailable, SandboxError
from corral.isolation.cgroups.values import CgroupLimits, CgroupUsage

logger = logging.getLogger(__name__)


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
