"""Cgroup drivers: pure logic, both versions against a fake kernel, and the host's for real.

The fake kernel is a tmp dir laid out like /sys/fs/cgroup that answers like cgroupfs:
mkdir fills in the interface files, and writes to cgroup.subtree_control, cgroup.freeze,
cgroup.kill, freezer.state and the v1 memory limits take effect. It is how v2 is tested on
a v1 host and v1 on a v2 host. The real-kernel tests run against whichever version the
host has, and clean up through fixture finalizers even when they fail.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.errors import InvalidLimits, InvalidRequest, IsolationUnavailable
from corral.isolation.cgroups import (
    Cgroup,
    CgroupDriver,
    CgroupFS,
    CgroupLimits,
    CgroupV1,
    CgroupV1Driver,
    CgroupV2,
    CgroupV2Driver,
    describe,
    parse_keyed,
    parse_mounts,
    v1_limit_writes,
    v2_limit_writes,
)
from tests.kit import processes
from tests.kit.polling import wait_until

MiB = 1 << 20
V1_UNLIMITED = "9223372036854771712"

# -- the fake kernel --------------------------------------------------------------------

V2_FILES: dict[str | None, dict[str, str]] = {
    None: {
        "cgroup.procs": "",
        "cgroup.events": "populated 0\nfrozen 0\n",
        "cgroup.freeze": "0\n",
        "cgroup.kill": "",
        "cgroup.subtree_control": "",
        "cgroup.controllers": "",
        "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
    },
    "memory": {
        "memory.current": "0\n",
        "memory.peak": "0\n",
        "memory.max": "max\n",
        "memory.swap.max": "max\n",
        "memory.oom.group": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    },
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "io": {"io.max": ""},
}
V1_FILES: dict[str | None, dict[str, str]] = {
    None: {"cgroup.procs": "", "tasks": "", "notify_on_release": "0\n"},
    "memory": {
        "memory.limit_in_bytes": f"{V1_UNLIMITED}\n",
        "memory.memsw.limit_in_bytes": f"{V1_UNLIMITED}\n",
        "memory.usage_in_bytes": "0\n",
        "memory.max_usage_in_bytes": "0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        "memory.swappiness": "60\n",
        "memory.use_hierarchy": "1\n",
    },
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n", "cpu.shares": "1024\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
}
NOT_ON_ROOT = {
    "cgroup.events",
    "cgroup.freeze",
    "cgroup.kill",
    "cpu.max",
    "freezer.state",
    "memory.max",
    "memory.oom.group",
    "memory.peak",
    "memory.swap.max",
    "pids.current",
    "pids.max",
}


class FakeKernel(CgroupFS):
    """cgroupfs emulated in a tmp dir; `absent` names interface files this 'kernel' lacks."""

    def __init__(self, root: Path, absent: frozenset[str] = frozenset()) -> None:
        self.root = root
        self.absent = absent
        self.mounts: dict[Path, tuple[int, tuple[str, ...]]] = {}
        self.mount_lines = ["proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0"]
        self.kills = 0

    # -- laying out the host

    def mount_v2(
        self, at: str = "/sys/fs/cgroup", controllers: tuple[str, ...] = ("cpu", "memory", "io")
    ) -> Path:
        path = self._mount(at, 2, controllers, f"cgroup2 {at} cgroup2 rw,nosuid,nsdelegate 0 0")
        (path / "cgroup.controllers").write_text(" ".join(controllers) + "\n")
        self.mkdir(str(path / "init.scope"))  # systemd's, so the driver can probe a child
        return path

    def mount_v1(self, at: str, controllers: tuple[str, ...]) -> Path:
        options = ",".join(("rw", "nosuid", "relatime", *controllers))
        return self._mount(at, 1, controllers, f"cgroup {at} cgroup {options} 0 0")

    def mounts_file(self) -> str:
        path = self.root / "proc/self/mounts"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.mount_lines) + "\n")
        return str(path)

    def detect(
        self, cls: type[CgroupDriver] = CgroupDriver, parent: str = "corral"
    ) -> CgroupDriver:
        return cls.detect(parent, mounts_file=self.mounts_file(), root=str(self.root), fs=self)

    def _mount(self, at: str, version: int, controllers: tuple[str, ...], line: str) -> Path:
        path = self.root / at.lstrip("/")
        path.mkdir(parents=True)
        self.mounts[path] = (version, controllers)
        self.mount_lines.append(line)
        self._populate(path)
        return path

    # -- CgroupFS, answering like the kernel

    def read(self, path: str) -> str:
        text = super().read(path)
        if path.endswith("/cgroup.procs"):  # dead processes leave their cgroup
            return "".join(f"{p}\n" for p in text.split() if _alive(int(p)))
        return text

    def mkdir(self, path: str) -> None:
        super().mkdir(path)
        self._populate(Path(path))

    def rmdir(self, path: str) -> None:
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        if self.subdirs(path) or self.read(f"{path}/cgroup.procs").split():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        shutil.rmtree(directory)

    def write(self, path: str, data: str) -> None:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        directory, name = file.parent, file.name
        if name == "cgroup.subtree_control":
            self._enable(directory, data)
        elif name == "cgroup.procs":
            file.write_text(file.read_text() + f"{int(data)}\n")
            self._set_event(directory, "populated", 1)
        elif name == "cgroup.freeze":
            file.write_text(data + "\n")
            self._set_event(directory, "frozen", int(data))
        elif name == "cgroup.kill":
            self.kills += 1
            for procs in [directory / "cgroup.procs", *directory.rglob("*/cgroup.procs")]:
                procs.write_text("")
            self._set_event(directory, "populated", 0)
        elif name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            value = int(V1_UNLIMITED) if data == "-1" else int(data)
            other = (
                "memory.memsw.limit_in_bytes" if "memsw" not in name else "memory.limit_in_bytes"
            )
            if (directory / other).exists():
                limit, memsw = int((directory / other).read_text()), value
                if "memsw" not in name:
                    limit, memsw = memsw, limit
                if memsw < limit:
                    raise OSError(errno.EINVAL, "Invalid argument", path)
            file.write_text(f"{value}\n")
        else:
            file.write_text(data + "\n")

    def _mount_of(self, path: Path) -> tuple[Path, int, tuple[str, ...]]:
        for mount, (version, controllers) in self.mounts.items():
            if path == mount or mount in path.parents:
                return mount, version, controllers
        raise AssertionError(f"{path} is outside every fake mount")

    def _populate(self, directory: Path) -> None:
        mount, version, controllers = self._mount_of(directory)
        is_root = directory == mount
        if version == 1:
            table, enabled = V1_FILES, controllers
        else:
            table = V2_FILES
            enabled = controllers if is_root else tuple(self._enabled(directory.parent))
            if not is_root:
                (directory / "cgroup.controllers").write_text(" ".join(enabled) + "\n")
        for controller in (None, *enabled):
            for name, content in table.get(controller, {}).items():
                skip = name in self.absent or (is_root and name in NOT_ON_ROOT)
                if not skip and not (directory / name).exists():
                    (directory / name).write_text(content)

    def _enabled(self, directory: Path) -> list[str]:
        return (directory / "cgroup.subtree_control").read_text().split()

    def _enable(self, directory: Path, data: str) -> None:
        mount, _, _ = self._mount_of(directory)
        offered = (directory / "cgroup.controllers").read_text().split()
        enabled = self._enabled(directory)
        for token in data.split():
            sign, controller = token[0], token[1:]
            if controller not in offered:
                raise OSError(errno.ENOENT, "No such file or directory", controller)
            if directory != mount and self.read(f"{directory}/cgroup.procs").split():
                raise OSError(errno.EBUSY, "Device or resource busy", str(directory))
            enabled = [c for c in enabled if c != controller] + ([controller] * (sign == "+"))
        (directory / "cgroup.subtree_control").write_text(" ".join(sorted(enabled)) + "\n")
        for child in self.subdirs(str(directory)):
            self._populate(directory / child)

    def _set_event(self, directory: Path, key: str, value: int) -> None:
        events = directory / "cgroup.events"
        if events.exists():
            values = parse_keyed(events.read_text()) | {key: value}
            events.write_text("".join(f"{k} {v}\n" for k, v in values.items()))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture
def kernel(tmp_path: Path) -> FakeKernel:
    return FakeKernel(tmp_path)


@pytest.fixture
def v2_host(kernel: FakeKernel) -> FakeKernel:
    """A pure v2 host like most users': cgroup2 at /sys/fs/cgroup with every controller."""
    kernel.mount_v2(controllers=("cpuset", "cpu", "io", "memory", "hugetlb", "pids", "rdma"))
    return kernel


V1_LAYOUT: dict[str, tuple[str, ...]] = {
    "/sys/fs/cgroup/cpu": ("cpu",),
    "/sys/fs/cgroup/cpuacct": ("cpuacct",),
    "/sys/fs/cgroup/memory": ("memory",),
    "/sys/fs/cgroup/pids": ("pids",),
    "/sys/fs/cgroup/freezer": ("freezer",),
    "/sys/fs/cgroup/devices": ("devices",),
}


def hybrid_host(kernel: FakeKernel, layout: dict[str, tuple[str, ...]] = V1_LAYOUT) -> FakeKernel:
    """Like this project's CI machine: v1 controllers, and an empty cgroup2 'unified'."""
    for at, controllers in layout.items():
        kernel.mount_v1(at, controllers)
    kernel.mount_v2("/sys/fs/cgroup/unified", controllers=())
    return kernel


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process whose pid the fake cgroups can hold; nothing else risks a signal."""
    process = processes.spawn(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def text(directory: str, name: str) -> str:
    return Path(directory, name).read_text().strip()


# -- pure logic ---------------------------------------------------------------------------


def test_parse_mounts_undoes_octal_escapes() -> None:
    mounts = parse_mounts(
        "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nsdelegate 0 0\n"
        "cgroup /mnt/my\\040cgroups/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
        "garbage\n"
    )
    assert [(m.path, m.fstype) for m in mounts] == [
        ("/sys/fs/cgroup", "cgroup2"),
        ("/mnt/my cgroups/cpu,cpuacct", "cgroup"),
    ]
    assert {"cpu", "cpuacct"} <= mounts[1].options


def test_parse_keyed_reads_kernel_key_value_files() -> None:
    assert parse_keyed("usage_usec 1500000\nuser_usec 1000000\nnr_periods 0\n") == {
        "usage_usec": 1500000,
        "user_usec": 1000000,
        "nr_periods": 0,
    }
    assert parse_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")["oom_kill"] == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_bytes": 1000},
        {"memory_bytes": 64.0 * MiB},
        {"memory_bytes": True},
        {"cpu_quota": 0},
        {"cpu_quota": 0.001},
        {"cpu_quota": -1.0},
        {"cpu_quota": float("nan")},
        {"cpu_quota": float("inf")},
        {"pids": 0},
        {"pids": "10"},
    ],
)
def test_limits_out_of_range_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidLimits):
        CgroupLimits(**kwargs)  # type: ignore[arg-type]


def test_cpu_quota_becomes_microseconds_per_100ms() -> None:
    assert CgroupLimits(cpu_quota=0.5).cpu_quota_us == 50_000
    assert CgroupLimits(cpu_quota=2).cpu_quota_us == 200_000
    assert CgroupLimits().cpu_quota_us is None


def test_v2_limit_formats() -> None:
    writes = v2_limit_writes(CgroupLimits(memory_bytes=64 * MiB, cpu_quota=1.5, pids=100))
    assert [(f, v) for f, v, _ in writes] == [
        ("memory.max", str(64 * MiB)),
        ("memory.swap.max", "0"),
        ("memory.oom.group", "0"),
        ("cpu.max", "150000 100000"),
        ("pids.max", "100"),
    ]
    unlimited = {f: v for f, v, _ in v2_limit_writes(CgroupLimits())}
    assert unlimited["memory.max"] == "max"
    assert unlimited["cpu.max"] == "max 100000"
    assert unlimited["pids.max"] == "max"


def test_v1_memory_writes_keep_memsw_above_limit() -> None:
    def memory_order(new: int | None, memsw: int | None) -> list[tuple[str, str]]:
        writes = v1_limit_writes(CgroupLimits(memory_bytes=new), memsw)
        return [(f, v) for c, f, v in writes if c == "memory"]

    # Lowering under the current memsw: limit first, then memsw.
    assert memory_order(32 * MiB, 64 * MiB) == [
        ("memory.limit_in_bytes", str(32 * MiB)),
        ("memory.memsw.limit_in_bytes", str(32 * MiB)),
    ]
    # Raising above it (or lifting it): memsw first.
    assert memory_order(128 * MiB, 64 * MiB) == [
        ("memory.memsw.limit_in_bytes", str(128 * MiB)),
        ("memory.limit_in_bytes", str(128 * MiB)),
    ]
    assert memory_order(None, 64 * MiB)[0] == ("memory.memsw.limit_in_bytes", "-1")
    # No swap accounting: no memsw file, swappiness 0 instead.
    assert memory_order(64 * MiB, None) == [
        ("memory.limit_in_bytes", str(64 * MiB)),
        ("memory.swappiness", "0"),
    ]


def test_v1_cpu_and_pids_formats() -> None:
    writes = v1_limit_writes(CgroupLimits(cpu_quota=0.25, pids=50), int(V1_UNLIMITED))
    rest = [(c, f, v) for c, f, v in writes if c != "memory"]
    assert rest == [
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "25000"),
        ("pids", "pids.max", "50"),
    ]
    unlimited = {f: v for _, f, v in v1_limit_writes(CgroupLimits(), None)}
    assert unlimited["cpu.cfs_quota_us"] == "-1"
    assert unlimited["pids.max"] == "max"


# -- detection ----------------------------------------------------------------------------


def test_detect_picks_v2_when_cgroup2_has_the_controllers(v2_host: FakeKernel) -> None:
    driver = v2_host.detect()
    assert isinstance(driver, CgroupV2Driver)
    assert driver.version == 2
    assert driver.mount == str(v2_host.root / "sys/fs/cgroup")
    assert driver.missing() == []


def test_detect_prefers_v2_over_v1_hierarchies(kernel: FakeKernel) -> None:
    kernel.mount_v1("/sys/fs/cgroup/net_cls", ("net_cls",))
    kernel.mount_v2("/sys/fs/cgroup/unified", controllers=("cpu", "memory", "pids"))
    assert kernel.detect().version == 2


def test_detect_picks_v1_on_a_hybrid_host(kernel: FakeKernel) -> None:
    driver = hybrid_host(kernel).detect()
    assert isinstance(driver, CgroupV1Driver)
    assert driver.version == 1
    assert set(driver.mount_points()) == {"memory", "cpu", "cpuacct", "pids", "freezer"}
    # Asking for v2 explicitly explains what the empty cgroup2 mount lacks.
    with pytest.raises(IsolationUnavailable, match="enable cgroup v2 delegation of memory"):
        kernel.detect(CgroupV2Driver)


def test_detect_names_the_missing_v1_controller(kernel: FakeKernel) -> None:
    layout: dict[str, tuple[str, ...]] = {k: v for k, v in V1_LAYOUT.items() if v != ("pids",)}
    with pytest.raises(IsolationUnavailable, match="mount the v1 pids controller"):
        hybrid_host(kernel, layout).detect()
    driver = CgroupV1Driver({"memory": str(kernel.root / "sys/fs/cgroup/memory")}, fs=kernel)
    assert driver.missing() == ["cpu", "cpuacct", "pids", "freezer"]
    with pytest.raises(IsolationUnavailable, match="cpu"):
        driver.create("sbx", CgroupLimits())


def test_detect_explains_v2_without_controllers(kernel: FakeKernel) -> None:
    kernel.mount_v2(controllers=("cpu", "io"))
    with pytest.raises(IsolationUnavailable, match=r"lacks memory, pids: enable cgroup v2"):
        kernel.detect()


def test_detect_without_any_cgroup_mount(kernel: FakeKernel) -> None:
    with pytest.raises(IsolationUnavailable, match="mount -t cgroup2"):
        kernel.detect()


def test_v2_freezer_missing_on_kernels_without_cgroup_freeze(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, absent=frozenset({"cgroup.freeze"}))
    kernel.mount_v2(controllers=("cpu", "memory", "pids"))
    with pytest.raises(IsolationUnavailable, match=r"lacks freezer: .*Linux 5\.2"):
        kernel.detect()


def test_describe_reports_versions_mounts_and_gaps(kernel: FakeKernel) -> None:
    hybrid_host(kernel)
    report = describe(mounts_file=kernel.mounts_file(), root=str(kernel.root))
    assert report["version"] == 1
    assert report["missing"] == []
    assert report["available"] == ["memory", "cpu", "cpuacct", "pids", "freezer"]
    assert report["cgroup2"] == {
        "mount": str(kernel.root / "sys/fs/cgroup/unified"),
        "controllers": [],
    }
    assert describe(mounts_file=str(kernel.root / "no/such/file"))["version"] is None


def test_names_are_validated(v2_host: FakeKernel) -> None:
    driver = v2_host.detect()
    for bad in ["", ".", "..", "a/b", "../etc", "x\0y", "cgroup.procs", "x" * 201]:
        with pytest.raises(InvalidRequest):
            driver.create(bad, CgroupLimits())
        with pytest.raises(InvalidRequest):
            driver.open(bad)
    with pytest.raises(InvalidRequest):
        CgroupV2Driver(parent="corral/../x")
    assert driver.list() == []


# -- v2 on the fake kernel ----------------------------------------------------------------


def test_v2_create_enables_controllers_and_writes_limits(v2_host: FakeKernel) -> None:
    driver = v2_host.detect()
    cgroup = driver.create("sbx-1", CgroupLimits(memory_bytes=64 * MiB, cpu_quota=0.5, pids=32))
    mount = v2_host.root / "sys/fs/cgroup"
    path = str(mount / "corral/sbx-1")
    assert isinstance(cgroup, CgroupV2)
    assert cgroup.directories() == [path]
    assert cgroup.procs_files() == [f"{path}/cgroup.procs"]
    for parent in (mount, mount / "corral"):
        assert {"cpu", "memory", "pids"} <= set(text(str(parent), "cgroup.subtree_control").split())
    assert text(path, "memory.max") == str(64 * MiB)
    assert text(path, "memory.swap.max") == "0"
    assert text(path, "memory.oom.group") == "0"
    assert text(path, "cpu.max") == "50000 100000"
    assert text(path, "pids.max") == "32"

    cgroup.set_limits(CgroupLimits())
    assert (text(path, "memory.max"), text(path, "cpu.max")) == ("max", "max 100000")


def test_v2_create_skips_files_an_older_kernel_lacks(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, absent=frozenset({"memory.swap.max", "memory.oom.group"}))
    kernel.mount_v2(controllers=("cpu", "memory", "pids"))
    cgroup = kernel.detect().create("sbx", CgroupLimits(memory_bytes=64 * MiB))
    assert text(cgroup.directories()[0], "memory.max") == str(64 * MiB)


def test_v2_create_refuses_a_parent_with_processes(v2_host: FakeKernel) -> None:
    parent = v2_host.root / "sys/fs/cgroup/busy"
    v2_host.mkdir(str(parent))
    (parent / "cgroup.procs").write_text(f"{os.getpid()}\n")
    driver = v2_host.detect(parent="busy")
    with pytest.raises(IsolationUnavailable, match="no controllers below a cgroup with processes"):
        driver.create("sbx", CgroupLimits())


def test_v2_list_open_and_existing(v2_host: FakeKernel) -> None:
    driver = v2_host.detect()
    driver.create("a", CgroupLimits())
    driver.create("b", CgroupLimits())
    assert driver.list() == ["a", "b"]
    opened = driver.open("a")
    assert opened is not None
    assert opened.name == "a"
    assert driver.open("c") is None
    with pytest.raises(InvalidRequest, match="already exists"):
        driver.create("a", CgroupLimits())


def test_v2_usage_is_parsed(v2_host: FakeKernel) -> None:
    cgroup = v2_host.detect().create("sbx", CgroupLimits(memory_bytes=64 * MiB))
    path = Path(cgroup.directories()[0])
    (path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (path / "memory.current").write_text("1048576\n")
    (path / "memory.peak").write_text("5242880\n")
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\n")
    (path / "pids.current").write_text("3\n")
    usage = cgroup.usage()
    assert usage.cpu_seconds == 2.5
    assert (usage.memory_bytes, usage.memory_peak_bytes) == (MiB, 5 * MiB)
    assert (usage.pids, usage.oom_kills) == (3, 2)


def test_v2_peak_without_memory_peak_is_the_highest_seen(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, absent=frozenset({"memory.peak"}))
    kernel.mount_v2(controllers=("cpu", "memory", "pids"))
    driver = kernel.detect()
    assert any("memory.peak" in note for note in driver.notes())
    cgroup = driver.create("sbx", CgroupLimits())
    current = Path(cgroup.directories()[0], "memory.current")
    current.write_text("3000\n")
    assert cgroup.usage().memory_peak_bytes == 3000
    current.write_text("1000\n")
    assert cgroup.usage().memory_peak_bytes == 3000


def test_v2_join_freeze_and_thaw(v2_host: FakeKernel, sleeper: subprocess.Popen[bytes]) -> None:
    cgroup = v2_host.detect().create("sbx", CgroupLimits())
    path = cgroup.directories()[0]
    cgroup.join(sleeper.pid)
    assert cgroup.pids() == [sleeper.pid]
    cgroup.freeze()
    assert text(path, "cgroup.freeze") == "1"
    assert cgroup.frozen()
    cgroup.thaw()
    assert text(path, "cgroup.freeze") == "0"
    assert not cgroup.frozen()


def test_v2_kill_all_uses_cgroup_kill_then_destroy_removes_it(
    v2_host: FakeKernel, sleeper: subprocess.Popen[bytes]
) -> None:
    driver = v2_host.detect()
    cgroup = driver.create("sbx", CgroupLimits())
    cgroup.join(sleeper.pid)
    cgroup.kill_all()
    assert v2_host.kills == 1
    assert cgroup.pids() == []
    assert sleeper.poll() is None  # the fake kernel's cgroup.kill signals nobody
    cgroup.destroy()
    assert not Path(cgroup.directories()[0]).exists()
    assert driver.open("sbx") is None
    cgroup.destroy()  # idempotent
    driver.remove_parent()
    assert not (v2_host.root / "sys/fs/cgroup/corral").exists()


def test_v2_kill_all_without_cgroup_kill_signals_every_process(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    kernel = FakeKernel(tmp_path, absent=frozenset({"cgroup.kill"}))
    kernel.mount_v2(controllers=("cpu", "memory", "pids"))
    cgroup = kernel.detect().create("sbx", CgroupLimits())
    cgroup.join(sleeper.pid)
    cgroup.kill_all()
    assert sleeper.wait(timeout=5) == -9
    assert cgroup.pids() == []
    assert not cgroup.frozen()  # thawed again after the round
    cgroup.destroy()
    assert not cgroup.exists()


# -- v1 on the fake kernel: layouts this host does not have ----------------------------------


def test_v1_co_mounted_cpu_and_cpuacct_share_one_directory(kernel: FakeKernel) -> None:
    layout: dict[str, tuple[str, ...]] = {
        k: v for k, v in V1_LAYOUT.items() if v not in (("cpu",), ("cpuacct",))
    }
    layout["/sys/fs/cgroup/cpu,cpuacct"] = ("cpu", "cpuacct")
    driver = hybrid_host(kernel, layout).detect()
    cgroup = driver.create("sbx", CgroupLimits(memory_bytes=64 * MiB, cpu_quota=2.0, pids=10))
    assert isinstance(cgroup, CgroupV1)
    cpu = str(kernel.root / "sys/fs/cgroup/cpu,cpuacct/corral/sbx")
    assert cgroup.paths["cpu"] == cgroup.paths["cpuacct"] == cpu
    assert len(cgroup.directories()) == len(cgroup.procs_files()) == 4
    assert text(cpu, "cpu.cfs_quota_us") == "200000"
    Path(cpu, "cpuacct.usage").write_text("1500000000\n")
    memory = cgroup.paths["memory"]
    Path(memory, "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    usage = cgroup.usage()
    assert (usage.cpu_seconds, usage.oom_kills) == (1.5, 4)
    cgroup.destroy()
    assert not any(Path(d).exists() for d in cgroup.directories())


def test_v1_memory_limits_raise_and_lower_in_kernel_order(kernel: FakeKernel) -> None:
    cgroup = hybrid_host(kernel).detect().create("sbx", CgroupLimits(memory_bytes=64 * MiB))
    memory = cgroup.directories()[2]
    for limit in (128 * MiB, 32 * MiB, None, 16 * MiB):
        cgroup.set_limits(CgroupLimits(memory_bytes=limit))  # the fake refuses memsw < limit
        expected = str(limit) if limit else V1_UNLIMITED
        assert text(memory, "memory.limit_in_bytes") == expected
        assert text(memory, "memory.memsw.limit_in_bytes") == expected


def test_v1_without_swap_accounting_sets_swappiness(tmp_path: Path) -> None:
    kernel = FakeKernel(tmp_path, absent=frozenset({"memory.memsw.limit_in_bytes"}))
    driver = hybrid_host(kernel).detect()
    assert isinstance(driver, CgroupV1Driver)
    assert not driver.swap_accounting()
    assert any("swappiness" in note for note in driver.describe()["notes"])  # type: ignore[attr-defined]
    cgroup = driver.create("sbx", CgroupLimits(memory_bytes=64 * MiB))
    memory = cgroup.directories()[2]
    assert text(memory, "memory.limit_in_bytes") == str(64 * MiB)
    assert text(memory, "memory.swappiness") == "0"


def test_v1_freeze_writes_freezer_state(kernel: FakeKernel) -> None:
    cgroup = hybrid_host(kernel).detect().create("sbx", CgroupLimits())
    assert isinstance(cgroup, CgroupV1)
    cgroup.freeze()
    assert text(cgroup.paths["freezer"], "freezer.state") == "FROZEN"
    assert cgroup.frozen()
    cgroup.thaw()
    assert not cgroup.frozen()


# -- the host's kernel, for real ---------------------------------------------------------------


@pytest.fixture(scope="module")
def host() -> Iterator[CgroupDriver]:
    """The host's driver under a parent of its own, removed afterwards with all it holds."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("real cgroup tests need Linux and root")
    try:
        driver = CgroupDriver.detect(parent=f"corral-test-{os.getpid()}")
    except IsolationUnavailable as exc:
        pytest.skip(f"this host has no usable cgroups: {exc}")
    yield driver
    for name in driver.list():
        cgroup = driver.open(name)
        if cgroup is not None:
            cgroup.destroy()
    driver.remove_parent()


@pytest.fixture
def make(host: CgroupDriver) -> Iterator[Callable[[CgroupLimits], Cgroup]]:
    made: list[Cgroup] = []

    def make(limits: CgroupLimits) -> Cgroup:
        made.append(host.create(f"t-{secrets.token_hex(4)}", limits))
        return made[-1]

    yield make
    for cgroup in made:
        cgroup.destroy()


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a process that joins a cgroup before it execs; all are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(cgroup: Cgroup, *argv: str) -> subprocess.Popen[bytes]:
        process = processes.spawn(
            argv,
            preexec_fn=lambda: cgroup.join(os.getpid()),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        return process

    yield spawn
    for process in started:
        process.kill()
        process.wait()


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


BUSY = python("while True: pass")

# Outside the cgroup it feeds, a subreaper reaps the bomb's orphans, which this host's
# init would leave as zombies.
FORK_BOMB = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
def join():
    for path in sys.argv[1:]:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
subprocess.Popen(["bash", "-c", ":(){ :|:& };:"], preexec_fn=join, stderr=subprocess.DEVNULL)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.05)
"""


@pytest.mark.integration
def test_host_limits_are_written(make: Callable[[CgroupLimits], Cgroup]) -> None:
    cgroup = make(CgroupLimits(memory_bytes=64 * MiB, cpu_quota=0.5, pids=32))
    assert all(os.path.isfile(p) for p in cgroup.procs_files())
    if isinstance(cgroup, CgroupV1):
        memory, cpu, pids = (cgroup.paths[c] for c in ("memory", "cpu", "pids"))
        assert text(memory, "memory.limit_in_bytes") == str(64 * MiB)
        if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):
            assert text(memory, "memory.memsw.limit_in_bytes") == str(64 * MiB)
        assert text(cpu, "cpu.cfs_period_us") == "100000"
        assert text(cpu, "cpu.cfs_quota_us") == "50000"
        assert text(pids, "pids.max") == "32"
    else:
        path = cgroup.directories()[0]
        assert text(path, "memory.max") == str(64 * MiB)
        assert text(path, "cpu.max") == "50000 100000"
        assert text(path, "pids.max") == "32"


@pytest.mark.integration
def test_host_memory_limit_can_be_raised_and_lowered(
    make: Callable[[CgroupLimits], Cgroup],
) -> None:
    cgroup = make(CgroupLimits(memory_bytes=64 * MiB))
    for limit in (128 * MiB, 32 * MiB, None, 48 * MiB):
        cgroup.set_limits(CgroupLimits(memory_bytes=limit))
    if isinstance(cgroup, CgroupV1):
        assert text(cgroup.paths["memory"], "memory.limit_in_bytes") == str(48 * MiB)
    else:
        assert text(cgroup.directories()[0], "memory.max") == str(48 * MiB)


@pytest.mark.integration
def test_host_child_joins_every_hierarchy(
    host: CgroupDriver,
    make: Callable[[CgroupLimits], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    cgroup = make(CgroupLimits(pids=8))
    child = spawn(cgroup, "sleep", "30")
    wait_until(lambda: cgroup.pids() == [child.pid], "the child in the cgroup", timeout=5)
    assert cgroup.usage().pids == 1
    membership = Path(f"/proc/{child.pid}/cgroup").read_text().splitlines()
    inside = [line for line in membership if line.endswith(f"/{host.parent}/{cgroup.name}")]
    assert len(inside) == len(cgroup.directories())  # v1: one line per hierarchy


@pytest.mark.integration
def test_host_memory_hog_is_oom_killed(
    make: Callable[[CgroupLimits], Cgroup], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cgroup = make(CgroupLimits(memory_bytes=64 * MiB))
    hog = spawn(cgroup, *python("x = bytearray(200 << 20)"))
    assert hog.wait(timeout=30) == -9
    usage = cgroup.usage()
    assert usage.oom_kills >= 1
    assert 32 * MiB <= usage.memory_peak_bytes <= 64 * MiB


@pytest.mark.integration
def test_host_fork_bomb_is_held_then_killed_and_destroyed(
    host: CgroupDriver, make: Callable[[CgroupLimits], Cgroup]
) -> None:
    cgroup = make(CgroupLimits(memory_bytes=256 * MiB, pids=40))
    reaper = processes.spawn([*python(FORK_BOMB), *cgroup.procs_files()])
    try:
        wait_until(lambda: cgroup.usage().pids >= 36, "36 pids in the cgroup", timeout=10)
        time.sleep(0.5)
        assert cgroup.usage().pids <= 40
        cgroup.kill_all()
        assert cgroup.pids() == []
        cgroup.destroy()
        assert not any(os.path.exists(d) for d in cgroup.directories())
        assert host.open(cgroup.name) is None
        assert cgroup.name not in host.list()
    finally:
        reaper.kill()
        reaper.wait()


@pytest.mark.integration
def test_host_freeze_stops_cpu_time(
    make: Callable[[CgroupLimits], Cgroup], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cgroup = make(CgroupLimits())
    spawn(cgroup, *BUSY)
    wait_until(lambda: cgroup.usage().cpu_seconds > 0.1, "CPU time", timeout=5)
    cgroup.freeze()
    assert cgroup.frozen()
    before = cgroup.usage().cpu_seconds
    time.sleep(0.3)
    assert cgroup.usage().cpu_seconds - before < 0.001
    cgroup.thaw()
    assert not cgroup.frozen()
    time.sleep(0.3)
    assert cgroup.usage().cpu_seconds - before > 0.05


@pytest.mark.integration
def test_host_cpu_quota_caps_a_busy_loop(
    make: Callable[[CgroupLimits], Cgroup], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    cgroup = make(CgroupLimits(cpu_quota=0.2))
    spawn(cgroup, *BUSY)
    time.sleep(0.3)
    start, cpu_start = time.monotonic(), cgroup.usage().cpu_seconds
    time.sleep(1.0)
    cores = (cgroup.usage().cpu_seconds - cpu_start) / (time.monotonic() - start)
    assert 0.05 < cores < 0.3


@pytest.mark.integration
def test_host_list_open_and_idempotent_destroy(
    host: CgroupDriver,
    make: Callable[[CgroupLimits], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    first, second = make(CgroupLimits()), make(CgroupLimits())
    assert {first.name, second.name} <= set(host.list())
    opened = host.open(first.name)
    assert opened is not None
    assert opened.directories() == first.directories()
    assert host.open("t-none") is None

    child = spawn(first, "sleep", "30")
    wait_until(lambda: first.pids() == [child.pid], "the child in the cgroup", timeout=5)
    opened.destroy()  # through the reaper's handle: kills the child too
    assert child.wait(timeout=5) == -9
    assert not first.exists()
    first.destroy()
    opened.destroy()
    assert first.name not in host.list()
    assert second.name in host.list()


@pytest.mark.integration
def test_kill_all_without_freezer_or_cgroup_kill_signals_through_pidfds(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    kernel = FakeKernel(tmp_path, absent=frozenset({"cgroup.kill", "cgroup.freeze"}))
    mount = kernel.mount_v2(controllers=("cpu", "memory", "pids"))
    kernel.mkdir(str(mount / "sbx"))
    cgroup = CgroupV2("sbx", str(mount / "sbx"), kernel)
    cgroup.join(sleeper.pid)
    with pytest.raises(IsolationUnavailable, match="no freezer"):
        cgroup.freeze()
    cgroup.destroy()
    assert sleeper.wait(timeout=5) == -9
    assert not cgroup.exists()
