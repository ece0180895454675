"""The `gvisor` tier: the guest agent in a gVisor sandbox (runsc), a kernel of its own.

Sandbox code talks to gVisor's sentry, a user-space kernel, never to the host's: a
kernel bug it can reach is the sentry's, which runs unprivileged in namespaces of its
own under a tight seccomp filter of runsc's. Corral hands runsc an OCI bundle under the
sandbox's footprint dir (`config.json` and an empty `root`) and execs
``runsc run`` as the launcher, inside the sandbox's cgroup: the sentry and its gofer
(the process that opens host files for it) are limited like any tier's processes, and
runsc is told that cgroup is the container's (`linux.cgroupsPath`), so the guest's own
view (`free`, `nproc`) follows the limits. The container's process is the guest agent,
its stdin and stdout the launcher's pipes.

What the sandbox sees is `namespace`'s (`guest_view`): the `host` template's binds
read-only with its shared /etc, or a layer template's root (`rootfs.make_user_root`,
writable to its own disk); /workspace, /home/user, /tmp and /dev/shm as tmpfs mounts
bounded by the storage limit (gVisor keeps tmpfs in the sentry's memory, charged to the
cgroup); its hostname, /etc/hosts and a boot id; volumes as bind mounts; no network
(`--network=none`: gVisor's own loopback) or the sandbox's own network namespace
(`--network=host` inside it: the sentry's sockets are host sockets there, so the
policy's nftables rules apply to them; never runsc's own netstack, whose raw socket
would bypass them). The agent runs as the sandbox's root in gVisor's kernel (gVisor is
the wall), each command as the template's user. Without root, runsc runs `--rootless`
(network none, `host` template, no volumes).

Known limits of runsc 2022 (Debian 12's): a sandbox past its memory limit ends whole
(the host's OOM killer sees one sentry; gVisor keeps no memory limit of its own), and
`statx` with AT_NO_AUTOMOUNT (coreutils 9's `ls -l`, `stat`) fails with EINVAL.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from corral.config import GVISOR_PLATFORMS, Settings
from corral.errors import IsolationUnavailable, SandboxError
from corral.isolation import idrange, netns
from corral.isolation.agent_install import (
    GUEST_DIR,
    agent_command,
    guest_runtime,
    install_agent,
)
from corral.isolation.backend import Backend, Capabilities, Entrypoint, LaunchPlan, SandboxSpec
from corral.isolation.cgroups import CgroupDriver, CgroupLimits
from corral.isolation.disks import DiskSpares
from corral.isolation.footprint import Footprint
from corral.isolation.guest_view import (
    BOOT_ID,
    HOME,
    PATH,
    ROOT_CAPS,
    WORKSPACE,
    guest_env,
    host_files,
    login_shell,
    shared_etc,
)
from corral.isolation.rootfs import Accounts, make_user_root, upper_dir
from corral.isolation.templates import SANDBOX_UID, SANDBOX_USER, get_template
from corral.isolation.volumes import attach as attach_volume
from corral.limits import MIB, Limits

# A `kvm` probe that has not finished by then is taken as hanging (it does on hosts with a
# /dev/kvm that cannot run guests) and killed.
KVM_PROBE_TIMEOUT = 2.0
# Where in a checkpoint directory runsc's state goes (`runsc checkpoint --image-path`).
_IMAGE = "runsc"
# And a layer template's sandbox's files (its overlay upper dir).
_UPPER = "upper"
# A checkpoint writes the sandbox's memory: seconds for a large one on a slow disk.
_CHECKPOINT_TIMEOUT = 300.0
# The host cgroup's pids limit of every gvisor sandbox. Guest tasks are not host tasks:
# runsc, the gofer and the sentry's threads are ~100 idle, then on the ptrace platform a
# sentry thread and stub threads per guest task and address space it runs in (a fork
# bomb held to 64 guest tasks peaked at 2,950-4,400 host tasks). The guest's own count,
# `Limits.pids`, is RLIMIT_NPROC, which gVisor keeps; this is the host's backstop, a
# quarter of a default pid_max (32768): past it the sentry cannot make a thread and the
# sandbox ends.
_HOST_TASKS = 8192
# Writable directories inside the sandbox, each a tmpfs: (sandbox path, mode, owner uid).
_WRITABLE = (
    (WORKSPACE, 0o755, SANDBOX_UID),
    (HOME, 0o755, SANDBOX_UID),
    ("/tmp", 0o1777, 0),
    ("/dev/shm", 0o1777, 0),
)


@dataclass(frozen=True)
class Runsc:
    """The installed runsc: its path, version and the platform chosen for this host, with
    why each other platform was not (for `corral doctor`)."""

    path: str
    version: str
    platform: str | None
    passed_over: Mapping[str, str]
    # Its command-line flags (`runsc flags`): they differ between the versions Debian ships.
    flags: frozenset[str] = frozenset()


def runsc_path() -> str | None:
    return shutil.which("runsc")


@functools.cache
def _version(runsc: str) -> tuple[str, frozenset[str], frozenset[str]]:
    """runsc's version, the platforms it knows (`runsc help platforms`) and its flags."""
    done = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=10)
    first = done.stdout.splitlines()[0] if done.stdout else ""
    version = first.removeprefix("runsc version ").strip() or "unknown"
    listed = subprocess.run(
        [runsc, "help", "platforms"], capture_output=True, text=True, timeout=10
    )
    platforms = frozenset(line.strip() for line in listed.stdout.splitlines() if line.strip())
    flags = subprocess.run([runsc, "flags"], capture_output=True, text=True, timeout=10)
    # Each flag's line is `  -name [type]`, its help on the lines after it.
    names = frozenset(re.findall(r"^\s+-([a-z0-9-]+)", flags.stdout + flags.stderr, re.M))
    return version, platforms, names


@functools.cache
def _platform_runs(runsc: str, platform: str) -> str | None:
    """None when `runsc --platform=<platform> do true` works here, else why not. Killed
    past `KVM_PROBE_TIMEOUT` (a kvm sandbox on a host whose /dev/kvm cannot run guests
    hangs); runsc's own children die with it (they have a parent-death signal)."""
    if platform == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not usable"
    state = tempfile.mkdtemp(prefix="corral-runsc-probe-")
    argv = [runsc, "--root", state, f"--platform={platform}", "--network=none"]
    if os.geteuid() != 0:
        argv.append("--rootless")
    try:
        done = subprocess.run(
            [*argv, "do", "true"],
            capture_output=True,
            text=True,
            timeout=KVM_PROBE_TIMEOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
            # `runsc do` makes its bundle dir under $TMPDIR and leaves it when it is
            # killed (the kvm trial here, every process that probes): inside `state`,
            # removed below.
            env={**os.environ, "TMPDIR": state},
        )
    except subprocess.TimeoutExpired:
        return f"`runsc --platform={platform} do true` did not finish in {KVM_PROBE_TIMEOUT:g} s"
    finally:
        shutil.rmtree(state, ignore_errors=True)
    if done.returncode != 0:
        return f"`runsc --platform={platform} do true` failed: {done.stderr.strip()[-300:]}"
    return None


def find_runsc(wanted: str) -> Runsc | None:
    """The installed runsc and the platform to use (`wanted`: a CORRAL_GVISOR_PLATFORM
    value); None when runsc is not installed. Probed once per process: callers in other
    threads at once (`Engine.load` probes off the event loop) wait for the one probe."""
    with _PROBING:
        return _find_runsc(wanted)


_PROBING = threading.Lock()


@functools.cache
def _find_runsc(wanted: str) -> Runsc | None:
    path = runsc_path()
    if path is None:
        return None
    version, known, flags = _version(path)
    passed_over: dict[str, str] = {}
    chosen = None
    candidates = [p for p in GVISOR_PLATFORMS if p != "auto"] if wanted == "auto" else [wanted]
    for platform in candidates:
        if chosen is not None:
            passed_over[platform] = f"{chosen} is preferred"
            continue
        if platform not in known:
            passed_over[platform] = f"runsc {version} has no {platform} platform"
            continue
        reason = _platform_runs(path, platform)
        if reason is None:
            chosen = platform
        else:
            passed_over[platform] = reason
    return Runsc(path, version, chosen, passed_over, flags)


class GvisorBackend(Backend):
    name = "gvisor"
    layer_templates = True
    volumes = True
    memory_snapshots = True

    def check_checkpoint(self, spec: SandboxSpec, what: str) -> None:
        super().check_checkpoint(spec, what)
        if os.geteuid() != 0:
            raise IsolationUnavailable(
                f"the gvisor tier cannot {what} without root: runsc cannot restore a "
                "rootless sandbox (`runsc --rootless restore` is refused); run Corral as "
                "root to keep a sandbox's memory"
            )
        if spec.network.mode != "none":
            raise IsolationUnavailable(
                f"the gvisor tier cannot {what} with network {spec.network.mode!r}: its "
                "sockets are the host's (runsc --network=host), which runsc cannot "
                "checkpoint; create the sandbox with network 'none' to keep its memory"
            )

    def checkpoint(self, footprint: Footprint, image: Path) -> None:
        """`runsc checkpoint`: the sentry writes its whole state (the processes, their
        memory, and the tmpfs mounts, which hold every file a `host` sandbox writes: its
        root and template binds are read-only) to one file, then the container exits.
        A layer template's sandbox writes its `/` to its disk instead, through the gofer:
        once nothing runs, its upper dir is copied beside (`cp -a`: owners, whiteouts,
        xattrs), and its restore starts from a copy of that (`rootfs.make_root`), so the
        gofer finds every file the sentry remembers at its path."""
        runsc = find_runsc(self.settings.gvisor_platform)
        assert runsc is not None  # it runs this sandbox
        argv = [runsc.path, "--root", str(footprint.path / "runsc")]
        argv += ["--log", str(footprint.path / "runsc-checkpoint.log")]
        argv += ["checkpoint", "--image-path", str(image / _IMAGE), footprint.id]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=_CHECKPOINT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise SandboxError(
                f"runsc did not checkpoint sandbox {footprint.id} in {_CHECKPOINT_TIMEOUT:g} s"
            ) from None
        if done.returncode != 0:
            raise SandboxError(
                f"runsc could not checkpoint sandbox {footprint.id}: "
                f"{done.stderr.strip()[-500:] or f'exit status {done.returncode}'}"
            )
        upper = upper_dir(footprint)
        if upper.is_dir():
            copied = subprocess.run(
                ["cp", "-a", str(upper), str(image / _UPPER)], capture_output=True, text=True
            )
            if copied.returncode != 0:
                raise SandboxError(
                    f"could not keep the files of sandbox {footprint.id}: "
                    f"{copied.stderr.strip()[-500:]}"
                )

    def network_modes(self) -> frozenset[str]:
        return _network_modes()

    def cgroup_limits(self, limits: Limits) -> CgroupLimits:
        """The guest's processes are the sentry's tasks, not host processes: the host
        cgroup's pids limit is a backstop for the sentry's threads (`_HOST_TASKS`), the
        guest is held to `limits.pids` by gVisor (RLIMIT_NPROC in the spec)."""
        return replace(super().cgroup_limits(limits), pids=_HOST_TASKS)

    def host_reaches_ports(self, footprint: Footprint) -> bool:
        # With network none the guest's sockets are in gVisor's own network stack, which
        # no host namespace holds: the agent connects for the host.
        return footprint.netns is not None

    @classmethod
    def probe(cls, settings: Settings) -> Capabilities:
        missing: list[str] = []
        details: dict[str, object] = {"root": os.geteuid() == 0}
        runsc = find_runsc(settings.gvisor_platform)
        if runsc is None:
            missing.append("runsc: apt-get install runsc")
        else:
            details["runsc"] = f"{runsc.path} ({runsc.version})"
            details["platform"] = runsc.platform or "none works"
            for platform, why in runsc.passed_over.items():
                details[f"platform {platform}"] = why
            if runsc.platform is None:
                which = (
                    "no runsc platform"
                    if settings.gvisor_platform == "auto"
                    else f"the platform {settings.gvisor_platform}"
                )
                missing.append(
                    f"{which} works here ({'; '.join(runsc.passed_over.values())}); "
                    "set CORRAL_GVISOR_PLATFORM to one that does"
                )
        if os.geteuid() != 0:
            details["rootless"] = (
                "runsc --rootless: network none only, no layer templates or volumes, and "
                "the guest sees the host's memory and CPUs (its limits still hold)"
            )
        try:
            driver = CgroupDriver.detect(settings.cgroup_parent)
            details["cgroups"] = f"v{driver.version}"
        except IsolationUnavailable as exc:
            missing.append(f"cgroups: {exc}")
        if not os.access(settings.guest_python, os.X_OK):
            missing.append(f"{settings.guest_python} for the guest agent: apt-get install python3")
        details["network"] = ", ".join(sorted(_network_modes()))
        details["memory snapshots"] = (
            "sandboxes with network none (pause to disk keeps their processes)"
            if os.geteuid() == 0
            else "none without root (runsc cannot restore rootless)"
        )
        return Capabilities(cls.name, not missing, tuple(missing), details)

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        # Layer templates' sandbox disks, a few formatted ahead (as `namespace` does).
        self._disks = DiskSpares(settings.data_dir / "disks", settings.runtime_dir)
        self._accounts = Accounts(settings.data_dir / "accounts")

    def close(self) -> None:
        self._disks.close()

    def plan(
        self, footprint: Footprint, spec: SandboxSpec, entrypoint: Entrypoint | None = None
    ) -> LaunchPlan:
        assert entrypoint is None, "the gvisor tier starts no entrypoints"
        runsc = find_runsc(self.settings.gvisor_platform)
        if runsc is None or runsc.platform is None:
            raise IsolationUnavailable("runsc is unavailable: run `corral doctor`")
        layered = spec.rootfs
        rootless = os.geteuid() != 0
        if rootless and (layered is not None or spec.volumes):
            raise IsolationUnavailable(
                "the gvisor tier needs Corral to run as root for layer templates and volumes "
                "(their disks are mounted by the host); run the server as root, or use the "
                "host template without volumes"
            )
        template = get_template(spec.template) if layered is None else None
        # A layer template may have no Python: the agent is the host's interpreter,
        # bound under /.corral (checked before anything is made for it).
        runtime = guest_runtime(self.settings.guest_python) if layered is not None else None
        limits = spec.limits
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        ]
        writable: tuple[tuple[str, int, int], ...] = _WRITABLE
        user, home, shell = (SANDBOX_UID, SANDBOX_UID), HOME, login_shell(None)
        if layered is not None:
            # The sentry shows file owners as the gofer reads them on the host: the
            # layers keep their own ids (an identity idmap), the sandbox's root is uid 0
            # of gVisor's kernel, never of the host's (the sentry and gofer run in user
            # namespaces of runsc's own).
            disk = self.settings.data_dir / "disks" / f"{footprint.id}.img"
            size = limits.storage_bytes if spec.ram_disk else limits.disk_bytes
            # Restored: its files are the checkpoint's upper dir (see `checkpoint`).
            upper = spec.restore / _UPPER if spec.restore is not None else None
            made = make_user_root(
                footprint, layered, self._disks, self._accounts, disk, size, 0,
                idrange.range_userns(0, 0), ram_disk=spec.ram_disk, upper=upper,
            )  # fmt: skip
            root, user, home, shell = (
                made.path,
                (made.uid, made.gid),
                made.home,
                login_shell(made.path),
            )
            writable = tuple(w for w in _WRITABLE if w[0] == "/dev/shm")  # the rest: its disk
        else:
            assert template is not None
            root = footprint.path / "bundle" / "root"
            root.mkdir(parents=True, mode=0o755)
            # The host template's root holds its symlinks (bin -> usr/bin ...), its binds
            # are mounts.
            for target, path in template.symlinks:
                os.symlink(target, root / path.lstrip("/"))
            # As on namespace: programs expect /var/tmp; the same bounded storage as /tmp.
            if not (root / "var").exists():
                (root / "var").mkdir(mode=0o755)
                os.symlink("/tmp", root / "var" / "tmp")
            for host_path, path in template.ro_binds:
                mounts.append(_bind(host_path, path))
            mounts.append(_bind(str(shared_etc(self.settings.runtime_dir, template)), "/etc"))
        # What names this sandbox: files of its footprint, bound over its /etc's.
        etc = footprint.path / "etc"
        etc.mkdir(mode=0o755)
        for name, text in host_files(footprint.id, footprint.netns is not None).items():
            (etc / name).write_text(text)
            (etc / name).chmod(0o644)
            mounts.append(_bind(str(etc / name), f"/etc/{name}"))
        # A boot of its own (gVisor has no boot_id): new at each start, never the host's.
        (etc / "boot_id").write_text(f"{uuid.uuid4()}\n")
        (etc / "boot_id").chmod(0o444)
        mounts.append(_bind(str(etc / "boot_id"), BOOT_ID))
        for path, mode, owner in writable:
            options = [f"size={limits.storage_bytes}", f"mode={mode:o}", "nosuid", "nodev"]
            uid, gid = (user[0], user[1]) if path == WORKSPACE else (owner, owner)
            mounts.append(_tmpfs(path, [*options, f"uid={uid}", f"gid={gid}"]))
        agent_dir = install_agent(self.settings.runtime_dir, self.settings.guest_python)
        mounts.append(_bind(str(agent_dir), GUEST_DIR))
        for tree in runtime.trees if runtime else ():  # onto the agent's empty dirs
            mounts.append(_bind(f"/{tree}", f"{GUEST_DIR}/{tree}"))
        workdir = (layered.workdir if layered else None) or WORKSPACE
        python = runtime.argv if runtime else self.settings.guest_python
        command = agent_command(GUEST_DIR, python, workdir)
        command += ["--user", f"{user[0]}:{user[1]}"]
        # Last: a volume may go inside /workspace or the home.
        for index, volume in enumerate(spec.volumes):
            mount = attach_volume(footprint, index, volume, 0)
            mounts.append(_bind(str(mount), volume.path, read_only=volume.read_only))
        user_name = layered.user if layered and not layered.user.isdigit() else SANDBOX_USER
        env = guest_env(home, user_name, shell, layered.env if layered else {}, spec.env)
        caps = list(ROOT_CAPS)
        namespaces = ["pid", "ipc", "uts", "mount"]
        if footprint.netns is None:
            namespaces.append("network")
        config: dict[str, Any] = {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0},
                "args": command,
                "env": [f"{key}={value}" for key, value in env.items()],
                "cwd": "/",
                "capabilities": {kind: caps for kind in ("bounding", "effective", "permitted")},
                "noNewPrivileges": True,
                "rlimits": [
                    _rlimit("RLIMIT_NOFILE", limits.open_files),
                    _rlimit("RLIMIT_NPROC", limits.pids),
                    _rlimit("RLIMIT_FSIZE", limits.file_size_mib * MIB),
                    _rlimit("RLIMIT_CORE", 0),
                ],
            },
            # A layer template's `/` is writable: its writes go to its disk.
            "root": {"path": str(root), "readonly": layered is None},
            "hostname": footprint.id.replace("_", "-"),
            "mounts": mounts,
            "linux": {
                # With a network, the sentry stays in the namespace the launcher joined
                # (`--network=host`); else runsc gives it an empty one of its own.
                "namespaces": [{"type": kind} for kind in namespaces],
            },
        }
        cgroups = ["--ignore-cgroups"]
        if not rootless:
            # runsc reads the limits of the cgroup the launcher joined (the guest's
            # `free` and `nproc` show them); it changes none, and removes none it did
            # not make. Without root it may not write there: it ignores cgroups.
            config["linux"]["cgroupsPath"] = f"/{self.settings.cgroup_parent}/{footprint.cgroup}"
            cgroups = ["--cpu-num-from-quota"]
        bundle = footprint.path / "bundle"
        bundle.mkdir(mode=0o700, exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(config))
        state = footprint.path / "runsc"
        state.mkdir(mode=0o700)
        network = "none" if footprint.netns is None else "host"
        argv = [
            runsc.path,
            "--root", str(state),
            f"--platform={runsc.platform}",
            f"--network={network}",
            *cgroups,
            *(["--rootless"] if rootless else []),
            # runsc since 2023 wraps the root in an overlay of its own by default, its
            # writes in a file it puts in the root (a layer's upper dir): the sandbox's
            # writes go to its own disk, as on the other tiers.
            *(["--overlay2=none"] if "overlay2" in runsc.flags else []),
            "--log", str(footprint.path / "runsc.log"),
        ]  # fmt: skip
        if spec.restore is None:
            argv += ["run", "--bundle", str(bundle), footprint.id]
        else:  # the same bundle, remade from the same spec: its mounts are the sandbox's
            argv += ["restore", "--image-path", str(spec.restore / _IMAGE)]
            argv += ["--bundle", str(bundle), footprint.id]
        return LaunchPlan(
            argv=argv,
            env={"PATH": PATH},
            workdir=workdir,
            host_cwd=str(bundle),
            netns=footprint.netns,
            userns=footprint.userns,
            host_rlimits=False,  # the spec's rlimits (gVisor keeps them)
        )


def _network_modes() -> frozenset[str]:
    # Without root, runsc makes the sentry's user namespace itself: it cannot join one
    # made for the sandbox's network (`usernet`), so it has no network.
    if netns.tools_missing() or os.geteuid() != 0:
        return frozenset({"none"})
    return frozenset({"none", "internet", "allowlist"})


def _bind(source: str, destination: str, *, read_only: bool = True) -> dict[str, Any]:
    options = ["rbind", "ro" if read_only else "rw", "nosuid", "nodev"]
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def _tmpfs(destination: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": options}


def _rlimit(kind: str, value: int) -> dict[str, Any]:
    return {"type": kind, "hard": value, "soft": value}
