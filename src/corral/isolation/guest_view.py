"""What a sandbox's programs find on every tier: its places, its environment, its /etc.

The `namespace` and `gvisor` tiers (and any tier that runs the `host` template) give
their guests the same view: the same paths, the same environment variables, the same
/etc made from the host's entries the template names (`shared_etc`), with the files that
name the sandbox (`host_files`) placed over it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from corral.isolation.rootfs import login_shell
from corral.isolation.templates import SANDBOX_UID, SANDBOX_USER, Template
from corral.network import resolver

HOME = f"/home/{SANDBOX_USER}"
WORKSPACE = "/workspace"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_ID = "/proc/sys/kernel/random/boot_id"

# What the sandbox's root keeps of its capabilities (in its own user namespace only):
# what dpkg and apt-get need — own and chown files, bypass file modes, keep set-id bits,
# switch users (apt's _apt, a service's account), signal its own processes — and binding
# ports under 1024 in its own network namespace. Each acts only on files and processes
# whose ids are in the sandbox's range (the kernel checks the ids are mapped there):
# host files bound in appear as nobody, other sandboxes have other ranges. Never
# CAP_SYS_ADMIN (mount, setns), CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_NET_ADMIN, CAP_MKNOD.
__all__ = [
    "BOOT_ID",
    "HOME",
    "PATH",
    "ROOT_CAPS",
    "WORKSPACE",
    "guest_env",
    "host_files",
    "login_shell",
    "shared_etc",
]

ROOT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
    "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_NET_BIND_SERVICE",
)  # fmt: skip


def guest_env(home: str, user: str, shell: str, *more: Mapping[str, str]) -> dict[str, str]:
    """The guest agent's environment (its commands start from it): a login's basics for
    `user`, then `more` (the template's, the caller's), later ones winning."""
    env = {
        "PATH": PATH,
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "SHELL": shell,
    }
    for extra in more:
        env.update(extra)
    return env


def host_files(sandbox_id: str, network: bool = False) -> dict[str, str]:
    hostname = sandbox_id.replace("_", "-")
    files = {
        "hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n",
        "hostname": f"{hostname}\n",
    }
    if network:  # names are resolved by the sandbox's own resolver, on its loopback
        files["resolv.conf"] = f"nameserver {resolver.ADDRESS}\noptions edns0\n"
    return files


def shared_etc(runtime_dir: Path, template: Template) -> Path:
    """The /etc of every sandbox of `template`: copies of the host entries it names, the
    sandbox user's passwd and group, and places for `host_files`.

    One bind of this directory replaces a bind per entry, each ~0.3 ms of every sandbox's
    start. A fresh copy is made when an entry changes on the host (mtime or size).
    """
    signature = hashlib.sha256(b"resolv.conf")  # the places for `host_files` changed
    for entry in template.etc:
        st = os.lstat(f"/etc/{entry}")
        signature.update(f"{entry}:{st.st_mtime_ns}:{st.st_size}\0".encode())
    target = runtime_dir / "etc" / f"{template.name}-{signature.hexdigest()[:16]}"
    if target.is_dir():
        return target
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        staging.chmod(0o755)
        # Copies keep the host's modes: what sandboxes could not read there, they can't here.
        for entry in template.etc:
            source, copy = Path("/etc", entry), staging / entry
            copy.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, copy, symlinks=True)
            else:
                shutil.copy2(source, copy, follow_symlinks=False)
        files = {
            "passwd": (
                "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}:{SANDBOX_USER}:{HOME}:/bin/bash\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
            "group": f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_UID}:\nnogroup:x:65534:\n",
            **{name: "" for name in host_files("", network=True)},
        }
        for name, text in files.items():
            (staging / name).write_text(text)
            (staging / name).chmod(0o644)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.is_dir():  # not another process's copy made first: a real failure
            raise
    return target
