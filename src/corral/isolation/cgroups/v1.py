"""cgroup v1: a directory of the sandbox's name in each controller hierarchy."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

from corral.errors import IsolationUnavailable
from corral.isolation.cgroups.cgroup import Cgroup, CgroupFS, _os_error
from corral.isolation.cgroups.driver import CgroupDriver
from corral.isolation.cgroups.values import (
    V1_CONTROLLERS,
    CgroupLimits,
    CgroupUsage,
    parse_keyed,
    v1_limit_writes,
)


class CgroupV1(Cgroup):
    """A sandbox cgroup in v1: a directory of the same name in each controller hierarchy."""

    def __init__(
        self, name: str, paths: Mapping[str, str], fs: CgroupFS, others: Sequence[str] = ()
    ) -> None:
        super().__init__(name, fs)
        self.paths = dict(paths)  # controller -> directory; co-mounted controllers share one
        # Its directories in the hierarchies Corral does not use (blkio, devices, ...):
        # runsc, told this is its container's cgroup, makes it there too.
        self.others = list(others)

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

    def destroy(self, timeout: float = 5.0) -> None:
        super().destroy(timeout)
        # Empty once the processes are gone (they are in the cgroup's own hierarchies too).
        deadline = time.monotonic() + timeout
        for top in self.others:
            for directory in reversed(list(self._walk(top))):
                self._rmdir(directory, deadline)

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


class CgroupV1Driver(CgroupDriver):
    """Sandbox cgroups in the v1 hierarchies: `<hierarchy>/<parent>/<name>` in each."""

    version = 1

    def __init__(
        self,
        hierarchies: Mapping[str, str],
        parent: str = "corral",
        fs: CgroupFS | None = None,
        others: Sequence[str] = (),
    ) -> None:
        super().__init__(parent, fs)
        # controller -> mount point; co-mounted controllers ("cpu,cpuacct") share one
        self.hierarchies = {c: p for c, p in hierarchies.items() if c in V1_CONTROLLERS}
        # The mount points of the other v1 hierarchies (`CgroupV1.others`).
        self.others = [p for p in others if p not in self.hierarchies.values()]

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
        others = [os.path.join(p, self.parent, name) for p in self.others]
        return CgroupV1(name, paths, self._fs, others)

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
