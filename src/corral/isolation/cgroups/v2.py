"""cgroup v2: one directory per sandbox in the unified hierarchy."""

from __future__ import annotations

import errno
import os
import platform
import re
from contextlib import suppress

from corral.errors import IsolationUnavailable
from corral.isolation.cgroups.cgroup import Cgroup, CgroupFS, _os_error
from corral.isolation.cgroups.driver import CgroupDriver
from corral.isolation.cgroups.values import (
    V2_CONTROLLERS,
    CgroupLimits,
    CgroupUsage,
    parse_keyed,
    v2_limit_writes,
)


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return found is not None and (int(found[1]), int(found[2])) >= (major, minor)


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
