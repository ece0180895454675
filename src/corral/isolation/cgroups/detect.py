"""Which cgroup version a host offers, from its mount table; and the doctor report."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from corral.errors import IsolationUnavailable
from corral.isolation.cgroups.cgroup import CgroupFS
from corral.isolation.cgroups.driver import MOUNTS_FILE, CgroupDriver
from corral.isolation.cgroups.v1 import CgroupV1Driver
from corral.isolation.cgroups.v2 import CgroupV2Driver
from corral.isolation.cgroups.values import V1_CONTROLLERS, V2_CONTROLLERS


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mounts."""

    path: str
    fstype: str
    options: frozenset[str]


def parse_mounts(text: str) -> list[Mount]:
    """Parse /proc/self/mounts, undoing the kernel's octal escapes (\\040 is a space)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            mounts.append(Mount(path, fields[2], frozenset(fields[3].split(","))))
    return mounts


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
    others: list[str] = []
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
            others.append(path)
    return v2, CgroupV1Driver(hierarchies, parent, fs, others) if hierarchies else None


def detect_driver(
    cls: type[CgroupDriver], parent: str, mounts_file: str, root: str, fs: CgroupFS
) -> CgroupDriver:
    """`CgroupDriver.detect`: the driver of `cls`'s version, or the best one for the host."""
    v2, v1 = _find_drivers(parent, mounts_file, root, fs)
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
