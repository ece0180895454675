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

What the sandbox sees, as on the `namespace` tier: the template's tree read-only (the
`host` template's binds, or a layer template's root made by `rootfs.make_root`), /etc
from `namespace`'s shared copies, /workspace, /home/user, /tmp and /dev/shm as tmpfs
mounts bounded by the storage limit (gVisor keeps tmpfs in the sentry's memory, charged
to the cgroup), a hostname, /etc/hosts, no network (`--network=none`) or the sandbox's
own network namespace (`--network=host` inside it: the sentry's sockets are host sockets
there, so the policy's nftables rules apply to them; never runsc's own netstack, whose
raw socket would bypass them). The agent runs as the sandbox's root (gVisor is the
wall), each command as the template's user.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from corral.config import GVISOR_PLATFORMS, Settings
from corral.errors import IsolationUnavailable
from corral.isolation import netns
from corral.isolation.agent_install import GUEST_DIR, agent_command, install_agent
from corral.isolation.backend import Backend, Capabilities, Entrypoint, LaunchPlan, SandboxSpec
from corral.isolation.cgroups import CgroupDriver, CgroupLimits
from corral.isolation.footprint import Footprint
from corral.isolation.namespace import (
    HOME,
    PATH,
    ROOT_CAPS,
    WORKSPACE,
    _host_files,
    _shared_etc,
    _shell,
)
from corral.isolation.templates import SANDBOX_UID, SANDBOX_USER, get_template
from corral.limits import Limits

# A `kvm` probe that has not finished by then is taken as hanging (it does on hosts with a
# /dev/kvm that cannot run guests) and killed.
KVM_PROBE_TIMEOUT = 2.0
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


def runsc_path() -> str | None:
    return shutil.which("runsc")


@functools.cache
def _version(runsc: str) -> tuple[str, frozenset[str]]:
    """runsc's version and the platforms it knows (`runsc help platforms`)."""
    done = subprocess.run([runsc, "--version"], capture_output=True, text=True, timeout=10)
    first = done.stdout.splitlines()[0] if done.stdout else ""
    version = first.removeprefix("runsc version ").strip() or "unknown"
    listed = subprocess.run(
        [runsc, "help", "platforms"], capture_output=True, text=True, timeout=10
    )
    platforms = frozenset(line.strip() for line in listed.stdout.splitlines() if line.strip())
    return version, platforms


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
        )
    except subprocess.TimeoutExpired:
        return f"`runsc --platform={platform} do true` did not finish in {KVM_PROBE_TIMEOUT:g} s"
    finally:
        shutil.rmtree(state, ignore_errors=True)
    if done.returncode != 0:
        return f"`runsc --platform={platform} do true` failed: {done.stderr.strip()[-300:]}"
    return None


@functools.cache
def find_runsc(wanted: str) -> Runsc | None:
    """The installed runsc and the platform to use (`wanted`: a CORRAL_GVISOR_PLATFORM
    value); None when runsc is not installed. Probed once per process."""
    path = runsc_path()
    if path is None:
        return None
    version, known = _version(path)
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
    return Runsc(path, version, chosen, passed_over)


class GvisorBackend(Backend):
    name = "gvisor"

    def network_modes(self) -> frozenset[str]:
        if netns.tools_missing():
            return frozenset({"none"})
        return frozenset({"none", "internet", "allowlist"})

    def cgroup_limits(self, limits: Limits) -> CgroupLimits:
        """The guest's processes are the sentry's tasks, not host processes: the host
        cgroup's pids limit is a backstop for the sentry's threads (`_HOST_TASKS`), the
        guest is held to `limits.pids` by gVisor (RLIMIT_NPROC in the spec)."""
        return replace(super().cgroup_limits(limits), pids=_HOST_TASKS)

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
            missing.append("runsc needs root here: run Corral as root for the gvisor tier")
        try:
            driver = CgroupDriver.detect(settings.cgroup_parent)
            details["cgroups"] = f"v{driver.version}"
        except IsolationUnavailable as exc:
            missing.append(f"cgroups: {exc}")
        if not os.access(settings.guest_python, os.X_OK):
            missing.append(f"{settings.guest_python} for the guest agent: apt-get install python3")
        network_missing = netns.tools_missing()
        details["network"] = "none" if network_missing else "none, internet, allowlist"
        return Capabilities(cls.name, not missing, tuple(missing), details)

    def plan(
        self, footprint: Footprint, spec: SandboxSpec, entrypoint: Entrypoint | None = None
    ) -> LaunchPlan:
        assert entrypoint is None, "the gvisor tier starts no entrypoints"
        runsc = find_runsc(self.settings.gvisor_platform)
        if runsc is None or runsc.platform is None:
            raise IsolationUnavailable("runsc is unavailable: run `corral doctor`")
        template = get_template(spec.template)
        limits = spec.limits
        bundle = footprint.path / "bundle"
        root = bundle / "root"
        root.mkdir(parents=True, mode=0o755)
        # The host template's root is its symlinks (bin -> usr/bin ...); its binds are mounts.
        for target, path in template.symlinks:
            os.symlink(target, root / path.lstrip("/"))
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
        ]
        for host_path, path in template.ro_binds:
            mounts.append(_bind(host_path, path, read_only=True))
        mounts.append(_bind(str(_shared_etc(self.settings.runtime_dir, template)), "/etc"))
        etc = footprint.path / "etc"
        etc.mkdir(mode=0o755)
        for name, text in _host_files(footprint.id, footprint.netns is not None).items():
            (etc / name).write_text(text)
            (etc / name).chmod(0o644)
            mounts.append(_bind(str(etc / name), f"/etc/{name}"))
        for path, mode, owner in _WRITABLE:
            options = [f"size={limits.storage_bytes}", f"mode={mode:o}", "nosuid", "nodev"]
            options += [f"uid={owner}", f"gid={owner}"]
            mounts.append(_tmpfs(path, options))
        agent_dir = install_agent(self.settings.runtime_dir, self.settings.guest_python)
        mounts.append(_bind(str(agent_dir), GUEST_DIR))
        workdir = WORKSPACE
        command = agent_command(GUEST_DIR, self.settings.guest_python, workdir)
        command += ["--user", f"{SANDBOX_UID}:{SANDBOX_UID}"]
        env = {
            "PATH": PATH,
            "HOME": HOME,
            "USER": SANDBOX_USER,
            "LOGNAME": SANDBOX_USER,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "SHELL": _shell(None),
            **spec.env,
        }
        caps = list(ROOT_CAPS)
        namespaces = ["pid", "ipc", "uts", "mount"]
        if footprint.netns is None:
            namespaces.append("network")
        config = {
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
                    _rlimit("RLIMIT_CORE", 0),
                ],
            },
            "root": {"path": str(root), "readonly": True},
            "hostname": footprint.id.replace("_", "-"),
            "mounts": mounts,
            "linux": {
                # With a network, the sentry stays in the namespace the launcher joined
                # (`--network=host`); else runsc gives it an empty one of its own.
                "namespaces": [{"type": kind} for kind in namespaces],
                "cgroupsPath": f"/{self.settings.cgroup_parent}/{footprint.cgroup}",
            },
        }
        (bundle / "config.json").write_text(json.dumps(config))
        state = footprint.path / "runsc"
        state.mkdir(mode=0o700)
        network = "none" if footprint.netns is None else "host"
        argv = [
            runsc.path,
            "--root", str(state),
            f"--platform={runsc.platform}",
            f"--network={network}",
            "--cpu-num-from-quota",
            "--log", str(footprint.path / "runsc.log"),
            "run", "--bundle", str(bundle), footprint.id,
        ]  # fmt: skip
        return LaunchPlan(
            argv=argv,
            env={"PATH": PATH},
            workdir=workdir,
            host_cwd=str(bundle),
            netns=footprint.netns,
            userns=footprint.userns,
        )


def _bind(source: str, destination: str, *, read_only: bool = True) -> dict[str, Any]:
    options = ["rbind", "ro" if read_only else "rw", "nosuid", "nodev"]
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def _tmpfs(destination: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": options}


def _rlimit(kind: str, value: int) -> dict[str, Any]:
    return {"type": kind, "hard": value, "soft": value}
