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

The package's modules: `values` (limits to controller values, I/O-free), `cgroup` (one
sandbox's cgroup and the cgroupfs boundary), `driver` (creating and finding cgroups),
`v2` and `v1` (each version's files and formats) and `detect` (which version a host has).
"""

from corral.isolation.cgroups.cgroup import Cgroup, CgroupFS
from corral.isolation.cgroups.detect import Mount, describe, parse_mounts
from corral.isolation.cgroups.driver import CgroupDriver
from corral.isolation.cgroups.v1 import CgroupV1, CgroupV1Driver
from corral.isolation.cgroups.v2 import CgroupV2, CgroupV2Driver
from corral.isolation.cgroups.values import (
    CPU_PERIOD_US,
    CgroupLimits,
    CgroupUsage,
    parse_keyed,
    v1_limit_writes,
    v2_limit_writes,
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
