"""The `namespace` tier: bubblewrap with every namespace, seccomp and an unprivileged uid.

Inside, the guest agent (and all code it runs) sees:
- the template's root filesystem read-only, a fresh /proc and a minimal /dev;
- /workspace, /tmp, /home/user and /dev/shm, writable, all on ONE tmpfs whose size is the
  sandbox's disk limit (when Corral runs as root; otherwise each is its own bounded tmpfs);
- no network but loopback; its own pid, ipc, uts and cgroup namespaces; a user namespace
  in which it is uid 1000 with no capabilities and may create no further user namespaces;
- the seccomp filter of `corral.isolation.seccomp`.
As root, each sandbox also runs as its own unprivileged host uid, so even a kernel escape
from the namespaces lands in an identity that owns nothing on the host.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from corral.config import Settings
from corral.errors import IsolationUnavailable
from corral.isolation import seccomp
from corral.isolation.agent_install import agent_command, install_agent
from corral.isolation.backend import Backend, Capabilities, LaunchPlan, SandboxSpec
from corral.isolation.cgroups import CgroupDriver
from corral.isolation.footprint import Footprint
from corral.isolation.templates import get_template

SANDBOX_UID = 1000
SANDBOX_USER = "user"
HOME = f"/home/{SANDBOX_USER}"
WORKSPACE = "/workspace"
AGENT_DIR = "/.corral"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Writable directories inside the sandbox: (name in the storage tmpfs, sandbox path, mode).
_WRITABLE = (
    ("workspace", WORKSPACE, 0o755),
    ("home", HOME, 0o755),
    ("tmp", "/tmp", 0o1777),
    ("shm", "/dev/shm", 0o1777),
)


@functools.cache
def _userns_works(bwrap: str) -> str | None:
    """None when bwrap can create a user namespace here, else the reason it can't."""
    probe = subprocess.run(
        [bwrap, "--unshare-user", "--ro-bind", "/", "/", "true"],
        capture_output=True,
        text=True,
    )
    return None if probe.returncode == 0 else probe.stderr.strip() or "bwrap failed"


class NamespaceBackend(Backend):
    name = "namespace"

    @classmethod
    def probe(cls, settings: Settings) -> Capabilities:
        missing: list[str] = []
        details: dict[str, object] = {"root": os.geteuid() == 0}
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
        if not os.access(settings.guest_python, os.X_OK):
            missing.append(f"{settings.guest_python} for the guest agent: apt-get install python3")
        try:
            seccomp.build_filter()
            details["seccomp"] = "on"
        except Exception as exc:
            missing.append(f"seccomp: {exc}")
        return Capabilities(cls.name, not missing, tuple(missing), details)

    def plan(self, footprint: Footprint, spec: SandboxSpec) -> LaunchPlan:
        template = get_template(spec.template)
        limits = spec.limits
        args = [
            shutil.which("bwrap") or "bwrap",
            "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup",
            "--disable-userns", "--die-with-parent", "--new-session",
            # The agent is the pid namespace's init: the kernel then ignores SIGKILL and
            # any signal it has no handler for when sent from inside, so sandbox code (same
            # uid) cannot kill the agent with `kill -9 -1`. The agent reaps orphans.
            "--as-pid-1",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--hostname", footprint.id.replace("_", "-"),
            "--proc", "/proc", "--dev", "/dev",
        ]  # fmt: skip
        for host_path, path in template.ro_binds:
            args += ["--ro-bind", host_path, path]
        for target, path in template.symlinks:
            args += ["--symlink", target, path]

        uid = gid = None
        if os.geteuid() == 0:
            slot = footprint.claim_uid_slot(
                self.settings.runtime_dir / "uids", self.settings.uid_count
            )
            uid = gid = self.settings.uid_base + slot
            storage = footprint.path / "rw"
            footprint.mount_tmpfs(storage, limits.disk_bytes, uid, gid)
            for name, path, mode in _WRITABLE:
                (storage / name).mkdir(mode=mode)
                os.chmod(storage / name, mode)
                os.chown(storage / name, uid, gid)
                args += ["--bind", str(storage / name), path]
        else:
            # Without root there is no shared tmpfs to mount: bound each directory alone.
            for _name, path, mode in _WRITABLE:
                args += ["--perms", oct(mode)[2:], "--size", str(limits.disk_bytes)]
                args += ["--tmpfs", path]

        etc = footprint.path / "etc"
        etc.mkdir(mode=0o755)
        _write_identity_files(etc, footprint.id)
        for name in ("passwd", "group", "hosts", "hostname"):
            args += ["--ro-bind", str(etc / name), f"/etc/{name}"]

        agent_dir = install_agent(self.settings.runtime_dir, self.settings.guest_python)
        args += ["--ro-bind", str(agent_dir), AGENT_DIR]
        args += ["--symlink", "/tmp", "/var/tmp"]  # programs expect it; same bounded storage
        args += ["--remount-ro", "/"]
        seccomp_fd = seccomp.filter_fd()
        args += ["--seccomp", str(seccomp_fd)]

        env = {
            "PATH": PATH,
            "HOME": HOME,
            "USER": SANDBOX_USER,
            "LOGNAME": SANDBOX_USER,
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
            "SHELL": "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh",
            **spec.env,
        }
        args += ["--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        args += ["--chdir", WORKSPACE, "--"]
        args += agent_command(AGENT_DIR, self.settings.guest_python, WORKSPACE)
        return LaunchPlan(
            argv=args,
            env={"PATH": PATH},
            workdir=WORKSPACE,
            uid=uid,
            gid=gid,
            pass_fds=(seccomp_fd,),
        )


def _write_identity_files(etc: Path, sandbox_id: str) -> None:
    hostname = sandbox_id.replace("_", "-")
    files = {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}:{SANDBOX_USER}:{HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n",
        "hostname": f"{hostname}\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)
        (etc / name).chmod(0o644)
