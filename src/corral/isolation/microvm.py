"""The `microvm` tier: each sandbox is a QEMU `microvm` machine with its own Linux kernel.

The guest boots Debian's cloud kernel straight from QEMU (no firmware, no PCI; ACPI
tables only to name the virtio-mmio devices, which this kernel cannot take from its
command line)
with Corral's initramfs (`corral.isolation.guest_kernel`), KVM when /dev/kvm can run a
guest here, else TCG (emulation: slow to boot, but the same machine). Its disks, all
virtio-blk, identified by serial:
- `corral-root`: the layer template's merged layers as an ext4 image, read-only, made
  once per template (by its layer digests) under the data dir (`images`);
- `corral-disk`: the sandbox's own sparse ext4 disk of `disk_mib`, the upper dir of the
  overlay the guest mounts as `/` (a block device, not a shared directory, so that a
  QEMU migration carries the whole sandbox);
- `corral-runtime`: the guest agent and the host's Python runtime it needs (interpreter,
  libraries, standard library), read-only at /.corral, made once per agent and Python;
- `corral-config`: a raw disk with the sandbox's host name, user, workdir and
  environment (never on QEMU's command line: `ps` shows that to every host user).
The agent talks over the virtio-serial port `corral.agent`, QEMU's stdio: the launcher's
pipes, so the guest protocol is the same as on every tier. The kernel's console goes to
`console.log` in the sandbox's footprint directory; its tail explains a failed boot.
QEMU runs in the sandbox's cgroup and, after opening its files as root, as the first id
of the sandbox's unprivileged range (`-runas`), under its own seccomp filter (`-sandbox`).

The guest sees `Limits.cpu` (rounded up) CPUs and `memory_mib` of RAM; QEMU's own memory
(device emulation, TCG's translation cache) comes on top of that in the cgroup
(`VMM_OVERHEAD_MIB`). The `host` template (the host's /usr, 5+ GB) has no image: its
sandboxes are refused with a pointer to a layer template such as `base`. Network: mode
`none` only (the guest has a loopback and no network device); volumes: none yet.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from corral.config import Settings
from corral.errors import IsolationUnavailable, SandboxStartFailed
from corral.guest import agent_source_dir
from corral.images import mount_merged, unmount_overlay
from corral.isolation import guest_kernel, idrange
from corral.isolation.agent_install import GUEST_DIR, guest_runtime, install_agent
from corral.isolation.backend import Backend, Capabilities, Entrypoint, LaunchPlan, SandboxSpec
from corral.isolation.cgroups import CgroupDriver
from corral.isolation.disks import format_disk
from corral.isolation.footprint import Footprint
from corral.isolation.templates import LayerTemplate
from corral.limits import Limits

QEMU = "qemu-system-x86_64"
# QEMU's memory beyond the guest's RAM, added to the sandbox's cgroup limit: measured
# RSS of an idle TCG guest of 256 MiB was ~RAM + 45 MiB with a 32 MiB translation cache;
# the rest is headroom for device buffers under I/O.
VMM_OVERHEAD_MIB = 128
TCG_CACHE_MIB = 32
# Trimmed: no probing of hardware a microvm does not have; a panic or a reboot stops the
# VM (QEMU runs with -no-reboot; a triple fault is the reset that always works).
KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init 8250.nr_uarts=1 i8042.noaux "
    "i8042.nokbd cryptomgr.notests random.trust_cpu=on"
)
# Under TCG the kernel finds no clock to calibrate the TSC against (no HPET, no ACPI PM
# timer, the PIT too slow) and hangs: its frequency and the delay loop are given.
TCG_CMDLINE = "tsc_early_khz=2000000 tsc=reliable no_timer_check lpj=4000000"
# A TCG boot takes seconds (several under load); the agent's first ping waits this long.
START_TIMEOUT = 120.0
_CONFIG_MAGIC = b"corral-vm-config\n"
# Parts of the standard library the agent never imports: left out of its image.
_STDLIB_SKIP = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
    "site-packages", "dist-packages", "config-3.11-x86_64-linux-gnu",
}  # fmt: skip


def kernel_dir(settings: Settings) -> Path:
    return (
        Path(settings.guest_kernel_dir)
        if settings.guest_kernel_dir
        else (settings.data_dir / "guest-kernel")
    )


@functools.cache
def kvm_reason(vmlinuz: str, initramfs: str) -> str | None:
    """None when QEMU can run a guest with KVM here, else why not. Boots the guest kernel
    with busybox as init (it exits at once: a panic, the VM stops) under a short timeout:
    on some hosts /dev/kvm opens but a guest never runs."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not accessible"
    argv = [
        QEMU, "-M", "microvm,x-option-roms=off", "-accel", "kvm", "-cpu", "host",
        "-m", "128", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", vmlinuz, "-initrd", initramfs, "-serial", "stdio",
        "-append", f"{KERNEL_CMDLINE.replace('rdinit=/init', 'rdinit=/bin/busybox')}",
    ]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "a KVM guest did not run within 10 s (nested virtualization unavailable?)"
    if "Run /bin/busybox" in done.stdout or "Kernel panic" in done.stdout:
        return None
    detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"QEMU could not run a KVM guest: {detail[-200:]}"


class MicrovmBackend(Backend):
    name = "microvm"
    layer_templates = True
    host_template = False

    start_timeout = START_TIMEOUT

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._images = settings.data_dir / "microvm"

    def cgroup_memory_bytes(self, limits: Limits) -> int:
        """The guest's RAM plus QEMU's own memory."""
        return limits.memory_bytes + (VMM_OVERHEAD_MIB << 20)

    @classmethod
    def probe(cls, settings: Settings) -> Capabilities:
        missing: list[str] = []
        details: dict[str, object] = {"network": "none", "volumes": "no"}
        if shutil.which(QEMU) is None:
            missing.append(f"{QEMU}: apt-get install qemu-system-x86")
        if shutil.which("mkfs.ext4") is None:
            missing.append("mkfs.ext4 (the guest's disks): apt-get install e2fsprogs")
        if os.geteuid() != 0:
            missing.append("root (the template images are made from mounted layers)")
        reason = guest_kernel.missing_reason(kernel_dir(settings))
        if reason:
            missing.append(reason)
        try:
            details["cgroups"] = f"v{CgroupDriver.detect(settings.cgroup_parent).version}"
        except IsolationUnavailable as exc:
            missing.append(f"cgroups: {exc}")
        try:
            details["guest_agent"] = guest_runtime(settings.guest_python).describe()
        except IsolationUnavailable as exc:
            missing.append(str(exc))
        if not missing:
            try:
                kernel = guest_kernel.extract(kernel_dir(settings))
                initramfs = guest_kernel.initramfs(kernel, settings.data_dir / "microvm")
            except (IsolationUnavailable, OSError) as exc:
                missing.append(f"guest kernel: {exc}")
            else:
                details["kernel"] = kernel.version
                why = kvm_reason(str(kernel.vmlinuz), str(initramfs))
                details["platform"] = "kvm" if why is None else f"tcg (no KVM: {why})"
        return Capabilities(cls.name, not missing, tuple(missing), details)

    def plan(
        self, footprint: Footprint, spec: SandboxSpec, entrypoint: Entrypoint | None = None
    ) -> LaunchPlan:
        layered = spec.rootfs
        # The engine refuses both before anything is made (`host_template`, `entrypoints`).
        assert layered is not None and entrypoint is None
        kernel = guest_kernel.extract(kernel_dir(self.settings))
        initramfs = guest_kernel.initramfs(kernel, self._images)
        root = root_image(layered, self._images / "roots")
        runtime = runtime_image(self.settings.guest_python, self.settings.runtime_dir,
                                self._images / "runtime")  # fmt: skip
        slot = footprint.claim_uid_slot(
            self.settings.runtime_dir / "uids",
            self.settings.uid_slots,
            idrange.kept_slots(self.settings),
        )
        first = idrange.first_id(self.settings, slot)
        limits = spec.limits
        disk = self.settings.data_dir / "disks" / f"{footprint.id}.img"
        disk.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        footprint.record_disk(str(disk))
        size = limits.storage_bytes if spec.ram_disk else limits.disk_bytes
        format_disk(disk, size)
        workdir = layered.workdir or "/workspace"
        config = footprint.path / "config.img"
        config.write_bytes(_config(footprint.id, layered, spec, workdir))
        console = footprint.path / "console.log"
        why_not_kvm = kvm_reason(str(kernel.vmlinuz), str(initramfs))
        accel = ["-accel", "kvm", "-cpu", "host"] if why_not_kvm is None else [
            "-accel", f"tcg,tb-size={TCG_CACHE_MIB}", "-cpu", "max",
        ]  # fmt: skip
        cpus = max(1, math.ceil(limits.cpu))
        argv = [
            QEMU,
            "-M", "microvm,x-option-roms=off",
            *accel,
            "-smp", str(cpus),
            "-m", str(limits.memory_bytes >> 20),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
            "-append", KERNEL_CMDLINE + ("" if why_not_kvm is None else " " + TCG_CMDLINE),
            "-serial", f"file:{console}",
            "-chardev", "stdio,id=agent,signal=off",
            "-device", "virtio-serial-device",
            "-device", "virtserialport,chardev=agent,name=corral.agent",
            *_disk("corral-runtime", runtime, read_only=True),
            *_disk("corral-root", root, read_only=True),
            *_disk("corral-disk", disk, read_only=False),
            *_disk("corral-config", config, read_only=True),
            "-qmp", f"unix:{footprint.path / 'qmp.sock'},server=on,wait=off",
            "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
            "-runas", f"{first}:{first}",
        ]  # fmt: skip
        # If QEMU exits (a failed boot: the init stops the VM), its console says why: what
        # the init and the agent said (lines without the kernel's timestamp), then the
        # kernel's last words.
        script = (
            '"$@"; status=$?; { grep -av "^\\[ *[0-9]" "$CORRAL_CONSOLE" | tail -n 20; '
            'grep -a "^\\[ *[0-9]" "$CORRAL_CONSOLE" | tail -n 3; } >&2; exit $status'
        )
        return LaunchPlan(
            argv=["/bin/sh", "-c", script, "corral-microvm", *argv],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CORRAL_CONSOLE": str(console)},
            workdir=workdir,
            host_cwd=str(footprint.path),
        )


def _disk(serial: str, image: Path, *, read_only: bool) -> list[str]:
    drive = f"if=none,id={serial},file={image},format=raw,cache=unsafe"
    if read_only:
        drive += ",readonly=on"
    return ["-drive", drive, "-device", f"virtio-blk-device,drive={serial},serial={serial}"]


def _config(sandbox_id: str, template: LayerTemplate, spec: SandboxSpec, workdir: str) -> bytes:
    """The configuration disk `corral.guest.vm_boot` reads (padded to whole sectors)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        **template.env,
        **spec.env,
    }
    fields = [sandbox_id.replace("_", "-"), template.user, workdir, "0"]
    fields += [f"{key}={value}" for key, value in env.items()]
    payload = "\0".join(fields).encode()
    data = _CONFIG_MAGIC + f"{len(payload)}\n".encode() + payload
    return data + b"\0" * (-len(data) % 512)


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


def root_image(template: LayerTemplate, directory: Path) -> Path:
    """The ext4 image of `template`'s merged layers, made once (keyed by their digests)."""
    key = hashlib.sha256("\0".join(template.digests).encode()).hexdigest()[:32]
    image = directory / f"{key}.img"
    if image.exists():
        return image
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
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
    return image


def runtime_image(python: str, runtime_dir: Path, directory: Path) -> Path:
    """The image mounted at /.corral in the guest: the agent (`install_agent`), the
    guest-side boot (`corral.guest.vm_boot`), busybox, and the host's `python` with the
    libraries and standard library it needs, at their host paths under it (the argv of
    `guest_runtime` then works there as it does in a namespace sandbox)."""
    agent = install_agent(runtime_dir, python)
    boot = (agent_source_dir() / "vm_boot.py").read_bytes()
    busybox = Path(guest_kernel.BUSYBOX).read_bytes()
    digest = hashlib.sha256(agent.name.encode() + boot + busybox)
    image = directory / f"{digest.hexdigest()[:32]}.img"
    if image.exists():
        return image
    runtime = guest_runtime(python)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        tree = Path(staging) / "tree"
        shutil.copytree(agent, tree, symlinks=True)
        (tree / "vm_boot.py").write_bytes(boot)
        (tree / "busybox").write_bytes(busybox)
        os.chmod(tree / "busybox", 0o755)
        argv = " ".join(shlex.quote(a) for a in runtime.argv)
        (tree / "start").write_text(f'exec {argv} -E -s -S {GUEST_DIR}/vm_boot.py "$1"\n')
        _copy_runtime(runtime.python, runtime.loader, tree)
        _mkfs(tree, Path(staging) / "runtime.img", 16)
        os.chmod(Path(staging) / "runtime.img", 0o444)
        os.replace(Path(staging) / "runtime.img", image)
    return image


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
