"""The microVM tier's guest kernel and initramfs: Debian's cloud kernel and a tiny init.

The kernel comes from Debian's archive as a .deb (`download`: `apt-get download` of
`linux-image-cloud-amd64` and the versioned package it depends on, run by `make setup`
or `python -m corral.isolation.guest_kernel [DIR]`). Its vmlinuz and the few modules a
microVM needs (`MODULES`: the cloud kernel builds virtio-mmio, virtio-blk, the virtio
console, overlayfs and virtio-net as modules) are extracted once per .deb and module set
into the kernel directory.

The initramfs is made by Corral: a cpio (newc) archive holding the host's static
busybox (Debian's busybox-static), those modules and `INIT`, the shell script that loads
them, mounts the sandbox's root (the template's read-only image under an overlay whose
upper dir is the sandbox's own disk, the guest agent's image at /.corral) and hands the
virtio-serial port `corral.agent` to the agent as its stdin and stdout. It is cached by
the digest of its content, so a change of any part makes a new one.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from corral.errors import IsolationUnavailable

PACKAGE = "linux-image-cloud-amd64"
BUSYBOX = "/bin/busybox"
# Loaded in this order (each after what it depends on). fuse and virtiofs only when the
# VM has shares (`corral.isolation.microvm_shares`); the last three (virtio-net) only when
# the guest has a network device (`corral.isolation.microvm_net`).
MODULES = (
    "virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "virtio_console", "overlay",
    "fuse", "virtiofs", "failover", "net_failover", "virtio_net",
)  # fmt: skip
BARE_BOOT_LINE = "corral-bare-boot"
_VERSIONED_DEB = re.compile(r"linux-image-(\d[^_]*)_[^_]+_amd64\.deb")

# The guest's PID 1 until the agent takes over. Disks are found by their serial (the
# order of virtio-mmio devices is QEMU's business), the agent's port by its name.
# On any failure it says why on the console (the host shows its tail) and stops the VM (QEMU
# runs with -no-reboot).
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "corral-init: $*" >&2; reboot -f; }
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs dev /dev || fail mounts
# A bare boot (the benchmark's baseline): the kernel and this init up, nothing more.
case " $(cat /proc/cmdline) " in *" corral.bare "*) echo corral-bare-boot; reboot -f;; esac
# The virtio-mmio devices are in QEMU's ACPI tables (this kernel has no command-line ones).
for m in virtio_ring virtio virtio_mmio virtio_blk virtio_console overlay; do
  insmod /lib/modules/$m.ko || fail "module $m"
done
case " $(cat /proc/cmdline) " in *" corral.virtiofs "*)
  for m in fuse virtiofs; do insmod /lib/modules/$m.ko || fail "module $m"; done;;
esac
# A network device (virtio id 1) only for a sandbox with a network.
if grep -qx 0x0001 /sys/bus/virtio/devices/*/device 2>/dev/null; then
  for m in failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko || fail "module $m"
  done
fi
disk() {
  for d in /sys/block/vd*; do  # `read`, not `$(cat ...)`: a process costs ~20 ms in TCG
    s=; read -r s 2>/dev/null <$d/serial
    [ "$s" = "$1" ] && { echo /dev/${d##*/}; return; }
  done
}
port() {
  for p in /sys/class/virtio-ports/*; do
    s=; read -r s 2>/dev/null <$p/name
    [ "$s" = corral.agent ] && { echo /dev/${p##*/}; return; }
  done
}
n=0
until [ -n "$(disk corral-config)" ] && [ -n "$(port)" ] && [ -e "$(port)" ]; do
  n=$((n+1)); usleep 10000
  [ $n -gt 500 ] && fail "no agent port or disks: $(ls /sys/block /sys/class/virtio-ports)"
done
mkdir -p /lower /rw /newroot
mount -t ext4 -o ro,noload "$(disk corral-root)" /lower || fail "root image"
# With a RAM disk (corral.ramdisk=BYTES) the sandbox's writes are the guest's memory.
ramdisk=$(for arg in $(cat /proc/cmdline); do
  case "$arg" in corral.ramdisk=*) echo "${arg#corral.ramdisk=}";; esac
done)
if [ -n "$ramdisk" ]; then
  # Memory is left for the guest's kernel and agent: a full RAM disk is an ENOSPC for
  # the writer, never an out-of-memory (as the namespace tier bounds its storage).
  total=$(awk '/^MemTotal:/ { print $2 * 1024 }' /proc/meminfo)
  [ "$ramdisk" -gt $((total - 100 * 1048576)) ] && ramdisk=$((total - 100 * 1048576))
  mount -t tmpfs -o "nosuid,nodev,mode=755,size=$ramdisk" ram /rw || fail "RAM disk"
else
  mount -t ext4 -o nosuid,nodev "$(disk corral-disk)" /rw || fail "sandbox disk"
fi
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
  || fail overlay
mkdir -p /newroot/.corral /newroot/proc /newroot/sys /newroot/dev
mount -t ext4 -o ro,noload,nodev "$(disk corral-runtime)" /newroot/.corral || fail "agent image"
config=$(disk corral-config)
agent=$(port)
mount --move /proc /newroot/proc && mount --move /sys /newroot/sys \
  && mount --move /dev /newroot/dev || fail "move mounts"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts || fail devpts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm || fail "/dev/shm"
ip link set lo up
exec switch_root /newroot /.corral/busybox sh /.corral/start "$config" \
  <>"/newroot$agent" >&0
"""


@dataclass(frozen=True)
class GuestKernel:
    """An extracted guest kernel: its image and the modules `MODULES` (name -> .ko)."""

    version: str
    vmlinuz: Path
    modules: dict[str, Path]


def kernel_deb(directory: Path) -> Path | None:
    """The newest versioned kernel .deb in `directory`, None when there is none."""
    if not directory.is_dir():
        return None
    debs = sorted(p for p in directory.iterdir() if _VERSIONED_DEB.fullmatch(p.name))
    return debs[-1] if debs else None


def missing_reason(directory: Path) -> str | None:
    """Why the microVM tier has no guest kernel in `directory`, None when it has one."""
    if kernel_deb(directory) is None:
        return (
            f"no guest kernel in {directory}: run `make setup`, or "
            f"`python -m corral.isolation.guest_kernel {directory}` (apt-get download {PACKAGE})"
        )
    if not os.access(BUSYBOX, os.X_OK):
        return "busybox for the guest's init: apt-get install busybox-static"
    return None


def download(directory: Path, package: str = PACKAGE) -> Path:
    """`apt-get download` the kernel `package` (a metapackage) and the versioned package
    it depends on into `directory`; the versioned .deb. Uses the host's apt sources."""
    directory.mkdir(parents=True, exist_ok=True)
    found = kernel_deb(directory)
    if found is not None:
        return found
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        os.chmod(staging, 0o777)  # apt downloads as _apt where it can
        _apt(["apt-get", "download", package], staging)
        meta = next(Path(staging).glob("*.deb"))
        depends = subprocess.run(
            ["dpkg-deb", "-f", str(meta), "Depends"], capture_output=True, text=True, check=True
        ).stdout
        versioned = next(
            (d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-")),
            None,
        )
        if versioned is None:
            raise IsolationUnavailable(f"{package} depends on no linux-image package: {depends}")
        _apt(["apt-get", "download", versioned], staging)
        for deb in Path(staging).glob("*.deb"):
            if _VERSIONED_DEB.fullmatch(deb.name):
                os.replace(deb, directory / deb.name)
    found = kernel_deb(directory)
    if found is None:
        raise IsolationUnavailable(f"apt-get download {package} gave no kernel .deb")
    return found


def _apt(argv: list[str], cwd: str) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise IsolationUnavailable(
            f"{' '.join(argv)} failed ({done.stderr.strip()[-300:]}): check the host's apt "
            "sources (apt-get update), or copy the kernel .deb into the kernel directory"
        )


def extract(directory: Path) -> GuestKernel:
    """The kernel of the newest .deb in `directory`, extracted there once (by version)."""
    reason = missing_reason(directory)
    deb = kernel_deb(directory)
    if reason is not None or deb is None:
        raise IsolationUnavailable(f"the microvm tier has no guest kernel: {reason}")
    match = _VERSIONED_DEB.fullmatch(deb.name)
    assert match is not None
    version = match.group(1)
    # By module set too: a kernel extracted for fewer modules stays for who uses it.
    target = directory / f"{version}-{hashlib.sha256(' '.join(MODULES).encode()).hexdigest()[:8]}"
    if not (target / "ready").exists():
        _extract(deb, version, target)
    return GuestKernel(
        version,
        target / "vmlinuz",
        {name: target / "modules" / f"{name}.ko" for name in MODULES},
    )


def _extract(deb: Path, version: str, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        (staging / "modules").mkdir()
        found: dict[str, bytes] = {}
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        assert dpkg.stdout is not None
        with tarfile.open(fileobj=dpkg.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                base = os.path.basename(name)
                wanted = name == f"boot/vmlinuz-{version}" or (
                    name.startswith(f"lib/modules/{version}/")
                    and base[:-3] in MODULES
                    and base.endswith(".ko")
                )
                if wanted and member.isfile():
                    content = tar.extractfile(member)
                    assert content is not None
                    found["vmlinuz" if name.startswith("boot/") else base[:-3]] = content.read()
        status = dpkg.wait()
        dpkg.stdout.close()  # after the wait: dpkg may still write the archive's padding
        if status != 0:
            raise IsolationUnavailable(f"dpkg-deb could not read {deb}: delete it and fetch again")
        missing = [n for n in ("vmlinuz", *MODULES) if n not in found]
        if missing:
            raise IsolationUnavailable(
                f"the kernel package {deb.name} lacks {', '.join(missing)} (built in? the "
                f"microvm tier expects {PACKAGE}'s modules)"
            )
        for name in MODULES:
            for dep in _depends(found[name]):
                if dep not in MODULES[: MODULES.index(name)]:
                    raise IsolationUnavailable(
                        f"the guest kernel's {name} needs the module {dep}, which the "
                        "microvm tier does not load: use a kernel matching " + PACKAGE
                    )
        (staging / "vmlinuz").write_bytes(found.pop("vmlinuz"))
        for name, data in found.items():
            (staging / "modules" / f"{name}.ko").write_bytes(data)
        (staging / "ready").touch()
        try:
            staging.rename(target)
        except OSError:  # another process extracted it first (or left an unfinished one)
            if not (target / "ready").exists():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _depends(module: bytes) -> list[str]:
    """The modules a .ko depends on (its .modinfo `depends=`)."""
    match = re.search(rb"\0depends=([^\0]*)\0", module)
    return [d for d in match.group(1).decode().split(",") if d] if match else []


def initramfs(kernel: GuestKernel, cache: Path) -> Path:
    """The initramfs for `kernel` (busybox, modules, `INIT`), made once per content."""
    files: list[tuple[str, int, bytes]] = [
        ("init", 0o755, INIT.encode()),
        ("bin/busybox", 0o755, Path(BUSYBOX).read_bytes()),
    ]
    files += [(f"lib/modules/{n}.ko", 0o644, p.read_bytes()) for n, p in kernel.modules.items()]
    digest = hashlib.sha256()
    for name, mode, data in files:
        digest.update(f"{name}\0{mode}\0{len(data)}\0".encode() + data)
    target = cache / f"initramfs-{digest.hexdigest()[:16]}.cpio"
    if target.exists():
        return target
    dirs = ["bin", "dev", "lib", "lib/modules", "proc", "sys", "run", "tmp"]
    archive = io.BytesIO()
    entries = [(d, 0o40755, b"") for d in dirs] + [(n, 0o100000 | m, d) for n, m, d in files]
    for number, (name, mode, data) in enumerate(entries, start=1):
        _cpio_entry(archive, number, name, mode, data)
    # The kernel opens /dev/console as init's stdio before any devtmpfs is mounted.
    _cpio_entry(archive, len(entries) + 1, "dev/console", 0o20600, b"", rdev=(5, 1))
    _cpio_entry(archive, 0, "TRAILER!!!", 0, b"")
    cache.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=cache)
    with os.fdopen(fd, "wb") as f:
        f.write(archive.getvalue())
    os.chmod(staging, 0o644)
    os.replace(staging, target)
    return target


def _cpio_entry(
    out: io.BytesIO, ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)
) -> None:
    """One newc entry: a 110-byte ASCII header, the name, the data, each padded to 4."""
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0]
    out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
    out.write(encoded + b"\0" * (-(110 + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


if __name__ == "__main__":  # `make setup`: fetch the guest kernel into a directory
    if len(sys.argv) > 2:
        sys.exit(f"usage: {sys.argv[0]} [DIRECTORY]  (default: the server's kernel directory)")
    if len(sys.argv) == 2:
        target = Path(sys.argv[1])
    else:  # where a server with this environment looks (CORRAL_GUEST_KERNEL_DIR or data_dir)
        from corral.config import Settings
        from corral.isolation.microvm import kernel_dir

        target = kernel_dir(Settings.from_env())
    print(download(target))
