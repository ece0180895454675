"""The `namespace` tier: bubblewrap with every namespace, seccomp and an unprivileged uid.

Inside, the guest agent (and all code it runs) — or, in a one-shot sandbox, its one
command — sees:
- the template's root filesystem read-only, a fresh /proc and a minimal read-only /dev;
- /workspace, /tmp, /home/user and /dev/shm, writable, all on ONE tmpfs whose size is the
  sandbox's disk limit, kept under its memory limit (`Limits.storage_bytes`) (when Corral
  runs as root; otherwise each is its own bounded tmpfs);
- no network but loopback (network `none`), or its own network namespace made by
  `corral.isolation.netns` (without root: `corral.isolation.usernet`) with the policy's
  rules loaded before it starts;
- its own pid, ipc, uts and cgroup namespaces; a user namespace in which code runs as
  uid 1000 (`user`) with no capabilities, and which may hold no further user namespaces;
- the seccomp filter of `corral.isolation.seccomp`.
As root, each sandbox owns a range of 65536 unprivileged host ids (`idrange`), so even a
kernel escape from the namespaces lands in an identity that owns nothing on the host, and
it has a `root` too: the guest agent runs as it, with `ROOT_CAPS` only, and starts each
command as its user (the template's by default). Without root, bubblewrap maps one id:
`user` is the only user.

What the sandbox can read of the host through /proc is trimmed: the /proc files that tell
about the host's hardware and kernel (`_PROC_MASKED`) are covered, and as root nothing it
binds comes from a path that names the host's runtime dir (see `_shared_root`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

from corral.config import Settings
from corral.errors import IsolationUnavailable
from corral.isolation import idrange, netns, seccomp
from corral.isolation.agent_install import (
    GUEST_DIR,
    agent_command,
    guest_runtime,
    install_agent,
)
from corral.isolation.backend import Backend, Capabilities, Entrypoint, LaunchPlan, SandboxSpec
from corral.isolation.cgroups import CgroupDriver
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
from corral.isolation.launcher import data_fd, setpriv
from corral.isolation.rootfs import Accounts, make_user_root, shm_dir
from corral.isolation.templates import SANDBOX_UID, SANDBOX_USER, get_template
from corral.isolation.volumes import attach as attach_volume

AGENT_DIR = GUEST_DIR

# Writable directories inside the sandbox: (name in the storage tmpfs, sandbox path, mode).
_WRITABLE = (
    ("workspace", WORKSPACE, 0o755),
    ("home", HOME, 0o755),
    ("tmp", "/tmp", 0o1777),
    ("shm", "/dev/shm", 0o1777),
)


# The /proc entries that describe the host: what Docker and runc mask (keys, timers,
# firmware tables, devices, kernel memory), plus the kernel's config, memory map and symbols.
_PROC_MASKED = (
    "acpi", "asound", "config.gz", "iomem", "kallsyms", "kcore",
    "keys", "latency_stats", "sched_debug", "scsi", "sysrq-trigger", "timer_list",
    "timer_stats",
)  # fmt: skip
# The shared tmpfs holds the sandboxes' /etc and the guest agent (~1.5 MiB).
_SHARED_SIZE = 64 << 20


@functools.cache
def _proc_masks() -> tuple[str, ...]:
    """bwrap options that cover `_PROC_MASKED`, probed once: /dev/null over each file
    (on the sandbox's nodev mount it cannot even be opened), an empty read-only tmpfs over
    each directory. Every mask is a mount, ~0.1-0.3 ms of each start, so only entries with
    something to hide get one: not an empty directory, nor a file only root may use (the
    sandbox's user namespace maps no uid to the host's root)."""
    options: list[str] = []
    for name in _PROC_MASKED:
        path = f"/proc/{name}"
        try:
            if os.path.isdir(path):
                if os.listdir(path):
                    options += ["--tmpfs", path, "--remount-ro", path]
            elif os.stat(path).st_mode & 0o006:  # others may read or write it
                options += ["--ro-bind", "/dev/null", path]
        except OSError:
            continue  # not on this kernel
    return tuple(options)


@functools.cache
def _bwrap() -> str:
    return shutil.which("bwrap") or "bwrap"


@functools.cache
def _userns_works(bwrap: str) -> str | None:
    """None when bwrap can create a user namespace here, else the reason it can't.

    The probe binds only the host template's trees (/usr and its neighbours), which `true`
    needs. A bind of the whole host (`/`) made bwrap remount every mount under it, one at
    a time, and another sandbox's mount unmounted meanwhile (its teardown, on a busy host)
    failed the probe: the namespace tier was then reported unusable for the life of the
    process."""
    host = get_template("host")
    argv = [bwrap, "--unshare-user"]
    for source, target in host.ro_binds:
        argv += ["--ro-bind", source, target]
    for link, target in host.symlinks:
        argv += ["--symlink", link, target]
    # By its path: the caller's PATH may name directories the namespace does not have.
    true = next((t for t in ("/usr/bin/true", "/bin/true") if os.path.exists(t)), "true")
    probe = subprocess.run([*argv, true], capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip() or "bwrap failed"


class NamespaceBackend(Backend):
    name = "namespace"
    entrypoints = True
    layer_templates = True
    volumes = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._shared: Path | None = None
        self._release_shared: weakref.finalize[[], NamespaceBackend] | None = None
        # Layer templates' sandbox disks, a few formatted ahead.
        self._disks = DiskSpares(settings.data_dir / "disks", settings.runtime_dir)
        self._accounts = Accounts(settings.data_dir / "accounts")

    def network_modes(self) -> frozenset[str]:
        if netns.tools_missing():
            return frozenset({"none"})
        return frozenset({"none", "internet", "allowlist"})

    @classmethod
    def probe(cls, settings: Settings) -> Capabilities:
        missing: list[str] = []
        details: dict[str, object] = {"platform": "bubblewrap", "root": os.geteuid() == 0}
        # Volumes are loop-mounted images: without root a sandbox asking for one is refused.
        details["volumes"] = "yes" if os.geteuid() == 0 else "no (needs root)"
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            missing.append("bubblewrap: apt-get install bubblewrap")
        else:
            details["bwrap"] = bwrap
            reason = _userns_works(bwrap)
            if reason:
                missing.append(
                    f"user namespaces: bwrap cannot create one ({reason}); "
                    "enable them with sysctl kernel.unprivileged_userns_clone=1"
                )
        try:
            driver = CgroupDriver.detect(settings.cgroup_parent)
            details["cgroups"] = f"v{driver.version}"
        except IsolationUnavailable as exc:
            missing.append(f"cgroups: {exc}")
        if os.geteuid() == 0 and setpriv() is None:
            missing.append("setpriv (each sandbox runs as its own uid): apt-get install util-linux")
        if not os.access(settings.guest_python, os.X_OK):
            missing.append(f"{settings.guest_python} for the guest agent: apt-get install python3")
        else:
            try:
                runtime = guest_runtime(settings.guest_python).describe()
            except IsolationUnavailable as exc:
                runtime = f"unavailable: {exc}"
            details["guest_agent"] = f"{settings.guest_python} (layer templates: {runtime})"
        try:
            seccomp.build_filter()
            details["seccomp"] = "on"
        except Exception as exc:
            missing.append(f"seccomp: {exc}")
        network_missing = netns.tools_missing()
        details["network"] = "none" if network_missing else "none, internet, allowlist"
        if network_missing:
            details["network_needs"] = "; ".join(network_missing)
        return Capabilities(cls.name, not missing, tuple(missing), details)

    def plan(
        self, footprint: Footprint, spec: SandboxSpec, entrypoint: Entrypoint | None = None
    ) -> LaunchPlan:
        layered = spec.rootfs
        template = get_template(spec.template) if layered is None else None
        if layered is not None and os.geteuid() != 0:
            raise IsolationUnavailable(
                f"sandboxes of the layer template {layered.name!r} need Corral to run as "
                "root for now (their disk and overlay are mounted by the host)"
            )
        # A layer template may have no Python, shell or glibc: its agent is the host's
        # interpreter, bound under /.corral (checked before anything is made for it).
        runtime = None
        if layered is not None and entrypoint is None:
            runtime = guest_runtime(self.settings.guest_python)
        limits = spec.limits
        options = [
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
            "--die-with-parent", "--new-session",
            "--hostname", footprint.id.replace("_", "-"),
        ]  # fmt: skip
        root = None
        uid = gid = None  # the launcher's host ids
        inner = (SANDBOX_UID, SANDBOX_UID)  # the default user's uid and gid inside
        home = HOME
        userns: Callable[[], int] | None = None
        userns_fd: int | None = None
        first = 0
        if os.geteuid() == 0:
            first = idrange.claim(self.settings, footprint)
            userns = idrange.range_userns(first, 0)  # made meanwhile
        if layered is not None:
            assert userns is not None
            disk = self.settings.data_dir / "disks" / f"{footprint.id}.img"
            # A RAM disk is bounded like a `host` sandbox's tmpfs storage: memory is left
            # for the agent when it is full (`Limits.storage_bytes`).
            size = limits.storage_bytes if spec.ram_disk else limits.disk_bytes
            made = make_user_root(
                footprint, layered, self._disks, self._accounts, disk, size, first, userns,
                ram_disk=spec.ram_disk,
            )  # fmt: skip
            root, inner, home = made.path, (made.uid, made.gid), made.home
            # First: the other mounts go on top of it. Writable: bounded by its disk.
            options += ["--bind", str(root), "/"]
        if userns is None:  # rootless: bubblewrap maps the one id there is
            options += ["--unshare-user", "--disable-userns"]
            options += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
        else:
            # The agent runs as the sandbox's root (it drops to each command's user); a
            # one-shot command as the default user. The launcher runs as that user's host
            # id, the owner of the namespace it enters (`idrange`).
            runs_as = (0, 0) if entrypoint is None else inner
            uid, gid = first + runs_as[0], first + runs_as[1]
            if entrypoint is not None and runs_as[0] != 0:
                with contextlib.suppress(Exception):
                    os.close(userns())
                userns = idrange.range_userns(first, runs_as[0])
            # Waited for now: its maker must not be left waiting if what follows fails.
            userns_fd = userns()
            options += ["--uid", str(runs_as[0]), "--gid", str(runs_as[1])]
            if runs_as[0] == 0:
                for cap in ROOT_CAPS:
                    options += ["--cap-add", cap]
        options += ["--proc", "/proc", "--dev", "/dev"]
        if footprint.netns is None:
            options.append("--unshare-net")  # loopback only
        # Else the launcher joins the namespace made for it, rules loaded (`netns`).
        if entrypoint is None:
            # The agent is the pid namespace's init: the kernel then ignores SIGKILL and
            # any signal it has no handler for when sent from inside, so sandbox code (same
            # uid) cannot kill the agent with `kill -9 -1`. The agent reaps orphans.
            options.append("--as-pid-1")
        # Else bubblewrap's own init is pid 1 (as confined as the command: same uid,
        # seccomp, no capabilities): it reaps orphans, and when the command exits it
        # exits too, which ends every process left in the namespace.
        options += _proc_masks()
        if template is not None:
            for host_path, path in template.ro_binds:
                options += ["--ro-bind", host_path, path]
            for target, path in template.symlinks:
                options += ["--symlink", target, path]

        if layered is not None:
            # /workspace, /tmp and the home are in its root already, on its disk.
            options += ["--bind", str(shm_dir(footprint)), "/dev/shm"]
        elif userns is not None:
            # bubblewrap, the sandbox's root here, would make the parents 0700.
            options += ["--perms", "0755", "--dir", "/home", "--perms", "0755", "--dir", "/var"]
            storage = footprint.path / "rw"
            owner = (first + inner[0], first + inner[1])
            footprint.mount_tmpfs(storage, limits.storage_bytes, *owner)
            for name, path, mode in _WRITABLE:
                (storage / name).mkdir(mode=mode)
                os.chmod(storage / name, mode)
                os.chown(storage / name, *owner)
                options += ["--bind", str(storage / name), path]
        else:
            # Without root there is no shared tmpfs to mount: bound each directory alone.
            for _name, path, mode in _WRITABLE:
                options += ["--perms", oct(mode)[2:], "--size", str(limits.disk_bytes)]
                options += ["--tmpfs", path]

        shared = self._shared_root()
        if template is not None:  # a layer template's /etc is its own
            options += ["--ro-bind", str(shared_etc(shared, template)), "/etc"]
        if entrypoint is None:
            agent_dir = install_agent(self.settings.runtime_dir, self.settings.guest_python)
            if shared != self.settings.runtime_dir:
                agent_dir = _copy_once(agent_dir, shared / "guest" / agent_dir.name)
            options += ["--ro-bind", str(agent_dir), AGENT_DIR]
            for tree in runtime.trees if runtime else ():  # onto the agent's empty dirs
                options += ["--ro-bind", f"/{tree}", f"{AGENT_DIR}/{tree}"]
            workdir = (layered.workdir if layered else None) or WORKSPACE
            python = runtime.argv if runtime else self.settings.guest_python
            command = agent_command(AGENT_DIR, python, workdir)
            if userns is not None:  # it runs as root: who the commands run as by default
                command += ["--user", f"{inner[0]}:{inner[1]}"]
        else:
            command = list(entrypoint.argv)
            workdir = entrypoint.cwd or (layered.workdir if layered else None) or WORKSPACE
        if template is not None:  # programs expect it; same bounded storage
            options += ["--symlink", "/tmp", "/var/tmp"]
        # Last: a volume may go inside /workspace or the home.
        for index, volume in enumerate(spec.volumes):
            if uid is None or gid is None:
                raise IsolationUnavailable(
                    "volumes need Corral to run as root (each is a loop-mounted ext4 image "
                    "with a size bound); run the server as root or leave volumes out"
                )
            mount = attach_volume(footprint, index, volume, first)
            options += ["--ro-bind" if volume.read_only else "--bind", str(mount), volume.path]

        user_name = layered.user if layered and not layered.user.isdigit() else SANDBOX_USER
        env = guest_env(
            home,
            user_name,
            login_shell(root),
            layered.env if layered else {},
            spec.env,
            entrypoint.env if entrypoint else {},
        )
        fds: list[int] = []
        try:
            if userns_fd is not None:
                fds.append(userns_fd)
                options += ["--userns", str(userns_fd)]
            # What names this sandbox (its hostname), from memory: no file to clean up.
            for name, text in host_files(footprint.id, footprint.netns is not None).items():
                fds.append(data_fd("corral-etc", text.encode()))
                options += ["--perms", "0644", "--ro-bind-data", str(fds[-1]), f"/etc/{name}"]
            # A boot of its own: new at each start (a snapshot's sandbox, a restart), the
            # same while it lives (a pause freezes it), never the host's.
            fds.append(data_fd("corral-boot-id", f"{uuid.uuid4()}\n".encode()))
            options += ["--perms", "0444", "--ro-bind-data", str(fds[-1]), BOOT_ID]
            if entrypoint is not None:
                # Files are copied in by bubblewrap as the sandbox user, parents created.
                for f in entrypoint.files:
                    fds.append(data_fd("corral-file", f.content))
                    options += ["--perms", f"{f.mode & 0o777:04o}", "--file", str(fds[-1]), f.path]
                options += ["--dir", workdir]
            # bubblewrap's /dev is a tmpfs of its own, unbounded: read-only, so that all
            # the sandbox can write is its storage (/dev/shm included), within disk_mib.
            # A layer template's `/` stays writable: its writes go to its disk.
            options += ([] if layered else ["--remount-ro", "/"]) + ["--remount-ro", "/dev"]
            fds.append(seccomp.filter_fd())
            options += ["--seccomp", str(fds[-1])]
            options += ["--clearenv"]
            for key, value in env.items():
                options += ["--setenv", key, value]
            options += ["--chdir", workdir]
            # The options go through a file descriptor, not the argv: every user of the
            # host can read a process's argv (ps), and environments hold secrets.
            fds.append(data_fd("corral-bwrap-args", b"".join(o.encode() + b"\0" for o in options)))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return LaunchPlan(
            argv=[_bwrap(), "--args", str(fds[-1]), "--", *command],
            env={"PATH": PATH},
            workdir=workdir,
            uid=uid,
            gid=gid,
            pass_fds=tuple(fds),
            exec_failure=b"bwrap: execvp ",
            netns=footprint.netns,
            userns=footprint.userns,
        )

    def _shared_root(self) -> Path:
        """Where this backend's sandboxes bind their /etc and guest agent from.

        A sandbox's /proc/self/mountinfo shows each bind's source as its path within its
        file system: from the host's disk, that is the runtime dir's path. So as root the
        files are copied (once) into a small tmpfs of this backend's own, where the path
        is only `/etc/host-…`. The tmpfs is recorded like a sandbox: `close` (or garbage
        collection, or exit) unmounts it, and after a SIGKILL the reaper does. Without
        root no tmpfs can be mounted: the files are bound from the runtime dir.
        """
        if os.geteuid() != 0:
            return self.settings.runtime_dir
        if self._shared is None:
            footprint = Footprint.create(
                self.settings.runtime_dir, f"shared_{secrets.token_hex(10)}", self.name
            )
            try:
                footprint.mount_tmpfs(footprint.path / "files", _SHARED_SIZE, 0, 0, mode=0o755)
            except BaseException:
                footprint.release()
                raise
            self._release_shared = weakref.finalize(self, footprint.release)
            self._shared = footprint.path / "files"
        return self._shared

    def close(self) -> None:
        self._disks.close()
        if self._release_shared is not None:
            self._release_shared()
        self._shared = self._release_shared = None


def _copy_once(source: Path, target: Path) -> Path:
    """`target`, a copy of the directory `source` unless it is there already."""
    if not target.is_dir():
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        staging.chmod(0o755)
        shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
        staging.rename(target)
    return target
