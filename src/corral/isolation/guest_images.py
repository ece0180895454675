"""The microVM tier's disk images, made once and shared read-only by its guests.

- `root_image`: a layer template's merged layers as an ext4 image (owners, modes and
  special files kept by `mkfs.ext4 -d`), keyed by the layers' digests;
- `runtime_image`: what the guest mounts at /.corral — the guest agent
  (`install_agent`), its boot (`corral.guest.vm_boot`), busybox, and the host's Python
  with the shared libraries it and its extension modules load and its standard library,
  at their host paths, so the argv of `guest_runtime` works there unchanged.
Each is made in a staging directory and renamed into place under a lock (one maker
across processes), read-only (0444): a running VM keeps the file it opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from corral.errors import SandboxStartFailed
from corral.images import mount_merged, unmount_overlay
from corral.isolation import guest_kernel
from corral.isolation.agent_install import (
    GUEST_DIR,
    guest_runtime,
    install_agent,
    python_options,
)
from corral.isolation.templates import LayerTemplate, Template

# Parts of the standard library the agent never imports: left out of its image.
_STDLIB_SKIP = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "site-packages", "dist-packages", "config-3.11-x86_64-linux-gnu",
}  # fmt: skip


def _mkfs(tree: Path, image: Path, extra_mib: int) -> None:
    """An ext4 image of `tree` (owners and modes kept), sized for it plus `extra_mib`."""
    used = subprocess.run(
        ["du", "-s", "--block-size=1M", "-x", str(tree)], capture_output=True, text=True
    )
    mib = int(used.stdout.split()[0]) if used.returncode == 0 else 1024
    size = int(mib * 1.15) + extra_mib
    done = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-d", str(tree),
         "-E", "root_owner=0:0", str(image), f"{size}M"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        raise SandboxStartFailed(f"could not make a guest disk image: {done.stderr[-300:]}")


@contextlib.contextmanager
def _building(image: Path) -> Iterator[bool]:
    """Held while `image` is made (one maker across processes); True if it must be."""
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(f"{image}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield not image.exists()
    finally:
        os.close(fd)


def root_image(template: LayerTemplate, directory: Path) -> Path:
    """The ext4 image of `template`'s merged layers, made once (keyed by their digests)."""
    key = hashlib.sha256("\0".join(template.digests).encode()).hexdigest()[:32]
    image = directory / f"{key}.img"
    if image.exists():
        return image
    with _building(image) as needed:
        if needed:
            _make_root_image(template, image)
    return image


def _make_root_image(template: LayerTemplate, image: Path) -> None:
    directory = image.parent
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        if len(template.layers) == 1:  # overlayfs wants two lowers or an upper
            _mkfs(template.layers[0], Path(staging) / "root.img", 64)
        else:
            merged = Path(staging) / "merged"
            merged.mkdir()
            mount_merged(list(template.layers), merged)
            try:
                _mkfs(merged, Path(staging) / "root.img", 64)
            finally:
                unmount_overlay(merged, lazy=True)
        os.chmod(Path(staging) / "root.img", 0o444)
        os.replace(Path(staging) / "root.img", image)


def runtime_image(python: str, runtime_dir: Path, directory: Path) -> Path:
    """The image mounted at /.corral in the guest: the agent (`install_agent`), the
    guest-side boot (`corral.guest.vm_boot`), busybox, and the host's `python` with the
    libraries and standard library it needs, at their host paths under it (the argv of
    `guest_runtime` then works there as it does in a namespace sandbox)."""
    agent = install_agent(runtime_dir, python)  # with the boot, vm_boot.py
    busybox = Path(guest_kernel.BUSYBOX).read_bytes()
    digest = hashlib.sha256(agent.name.encode() + busybox)
    image = directory / f"{digest.hexdigest()[:32]}.img"
    if image.exists():
        return image
    with _building(image) as needed:
        if needed:
            _make_runtime_image(python, agent, busybox, image)
    return image


def _make_runtime_image(python: str, agent: Path, busybox: bytes, image: Path) -> None:
    runtime = guest_runtime(python)
    directory = image.parent
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        tree = Path(staging) / "tree"
        shutil.copytree(agent, tree, symlinks=True)
        (tree / "busybox").write_bytes(busybox)
        os.chmod(tree / "busybox", 0o755)
        argv = [*runtime.argv, *python_options(GUEST_DIR, "vm_boot")]  # its bytecode
        argv_text = " ".join(shlex.quote(a) for a in argv)
        (tree / "start").write_text(f'exec {argv_text} "$1"\n')
        _copy_runtime(runtime.python, runtime.loader, tree)
        _mkfs(tree, Path(staging) / "runtime.img", 16)
        os.chmod(Path(staging) / "runtime.img", 0o444)
        os.replace(Path(staging) / "runtime.img", image)


def _copy_runtime(python: str, loader: str | None, tree: Path) -> None:
    """Copy `python`, its loader, the shared libraries it and its extension modules
    load (under the name the loader looks for, in the directory `guest_runtime` names)
    and its standard library into `tree`, at their host paths."""
    stdlib = subprocess.run(
        [python, "-E", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    stdlib = os.path.realpath(stdlib)

    def place(source: str, name: str | None = None) -> None:
        real = os.path.realpath(source)
        target = tree / (os.path.dirname(real).lstrip("/")) / (name or os.path.basename(real))
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copy2(real, target)

    place(python)
    shutil.copytree(
        stdlib,
        tree / stdlib.lstrip("/"),
        symlinks=True,
        ignore=lambda _d, names: [n for n in names if n in _STDLIB_SKIP],
        dirs_exist_ok=True,
    )
    if loader is None:
        return
    place(loader)
    objects = [python, *map(str, Path(stdlib, "lib-dynload").glob("*.so"))]
    for obj in objects:
        listed = subprocess.run(
            [loader, "--inhibit-cache", "--list", obj], capture_output=True, text=True
        )
        for line in listed.stdout.splitlines():
            if "=>" in line:
                path = line.split("=>", 1)[1].split("(")[0].strip()
                if path.startswith("/"):
                    place(path, os.path.basename(path))


def host_root_image(template: Template, etc: Path, directory: Path) -> Path:
    """The root of a `template` sandbox (the `host` template) as an ext4 image: its /etc
    (`etc`, `guest_view.shared_etc`'s copy), its symlinks and empty places for the host
    directories the guest mounts over virtio-fs (`microvm_shares.host_shares`) and for
    the sandbox's own directories. Small; made once per /etc copy."""
    key = hashlib.sha256(repr((etc.name, template.ro_binds, template.symlinks)).encode())
    image = directory / f"{template.name}-{key.hexdigest()[:32]}.img"
    if image.exists():
        return image
    with _building(image) as needed:
        if needed:
            with tempfile.TemporaryDirectory(dir=directory) as staging:
                tree = Path(staging) / "tree"
                shutil.copytree(etc, tree / "etc", symlinks=True)
                places = [path for _, path in template.ro_binds]
                places += ["/workspace", "/home", "/tmp", "/var", "/root", "/proc", "/sys"]
                for place in [*places, "/dev", GUEST_DIR]:
                    (tree / place.lstrip("/")).mkdir(mode=0o755, parents=True, exist_ok=True)
                os.chmod(tree / "tmp", 0o1777)
                os.chmod(tree / "root", 0o700)
                for target, path in template.symlinks:
                    (tree / path.lstrip("/")).symlink_to(target)
                (tree / "var" / "tmp").symlink_to("/tmp")  # as the namespace tier has it
                _mkfs(tree, Path(staging) / "root.img", 16)
                os.chmod(Path(staging) / "root.img", 0o444)
                os.replace(Path(staging) / "root.img", image)
    return image
