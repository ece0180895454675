"""The `microvm` tier: each sandbox is a QEMU `microvm` machine with its own Linux kernel.

The guest boots Debian's cloud kernel straight from QEMU (no firmware, no PCI; ACPI
tables only to name the virtio-mmio devices, which this kernel cannot take from its
command line) with Corral's initramfs (`corral.isolation.guest_kernel`), KVM when
/dev/kvm can run a guest here, else TCG (emulation: slow to boot, but the same
machine). Its disks, all virtio-blk, identified by serial:
- `corral-root`: the layer template's merged layers as an ext4 image, read-only, made
  once per template (by its layer digests) under <data_dir>/microvm (`guest_images`);
- `corral-disk`: the sandbox's own sparse ext4 disk of `disk_mib`, the upper dir of the
  overlay the guest mounts as `/` (a block device, not a shared directory, so that a
  QEMU migration carries the whole sandbox); with `ram_disk`, no disk: a tmpfs in the
  guest, its RAM. A snapshot reads it on the host (`snapshot_files`) once the guest has
  synced and is frozen;
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
(`VMM_OVERHEAD_MIB`). The `host` template (the host's /usr, 5+ GB) has no image of
it: its root is a small image of its /etc and symlinks, and the host's /usr, like
volumes, a host directory the guest mounts over virtio-fs (`microvm_shares`). A
one-shot sandbox's guest runs its command instead of the agent (`microvm_oneshot`).
Network: with `none` the guest has a loopback only; with `internet` or `allowlist` a
virtio-net device on a tap in the sandbox's network namespace, behind the same rules as
every tier's (`corral.isolation.microvm_net`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

from corral.config import IDS_PER_SLOT, Settings
from corral.errors import IsolationUnavailable, SnapshotUnavailable
from corral.images import unmount_overlay
from corral.isolation import (
    guest_kernel,
    idrange,
    microvm_net,
    microvm_oneshot,
    microvm_shares,
    microvm_snapshot,
)
from corral.isolation.agent_install import GUEST_DIR, guest_runtime
from corral.isolation.backend import Backend, Capabilities, Entrypoint, LaunchPlan, SandboxSpec
from corral.isolation.cgroups import CgroupDriver
from corral.isolation.disks import format_disk
from corral.isolation.footprint import Footprint
from corral.isolation.guest_images import host_root_image, root_image, runtime_image
from corral.isolation.guest_view import shared_etc
from corral.isolation.templates import SANDBOX_USER, get_template
from corral.limits import Limits

QEMU = "qemu-system-x86_64"
# QEMU's memory beyond the guest's RAM, added to the sandbox's cgroup limit. Measured
# (TCG, 32 MiB translation cache): a 256 MiB guest idle after boot, cgroup 198 MiB; the
# same guest with all its memory touched (its own OOM killer acting), cgroup 326 MiB —
# ~70 MiB over the guest's RAM, with the page cache of its disk writes (reclaimable).
VMM_OVERHEAD_MIB = 128
TCG_CACHE_MIB = 32
# Trimmed: no probing of hardware a microvm does not have; a panic or a reboot stops the
# VM (QEMU runs with -no-reboot; a triple fault is the reset that always works).
KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 reboot=t rdinit=/init 8250.nr_uarts=1 i8042.noaux "
    "i8042.nokbd cryptomgr.notests random.trust_cpu=on"
)
# Under TCG the kernel finds no clock to calibrate the TSC against (no HPET, no ACPI PM
# timer, the PIT too slow) and hangs: its frequency and the delay loop are given. TCG's
# guest TSC is the host's, so its frequency is the host's (`_host_tsc_khz`): a guessed one
# made the guest's clock run 1.29x fast here (2.6 GHz host, 2 GHz given).
TCG_CMDLINE = "tsc_early_khz={khz} tsc=reliable no_timer_check lpj=4000000"
# When the host does not say its TSC frequency.
_DEFAULT_TSC_KHZ = 2_000_000
# A TCG boot takes seconds (several under load); the agent's first ping waits this long.
START_TIMEOUT = 120.0
_CONFIG_MAGIC = b"corral-vm-config\n"
AGENT_CHARDEV = "stdio,id=agent,signal=off"
_KERNEL_LINE = re.compile(r"\[ *\d+\.\d+\]")


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
    host_template = True  # its /usr over virtio-fs: `corral.isolation.microvm_shares`
    memory_snapshots = True  # QEMU migration to a file: `corral.isolation.microvm_snapshot`
    volumes = True  # virtio-fs: `corral.isolation.microvm_shares`
    entrypoints = True  # the guest runs the command: `corral.isolation.microvm_oneshot`

    start_timeout = START_TIMEOUT

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._images = settings.data_dir / "microvm"

    def network_modes(self) -> frozenset[str]:
        return microvm_net.network_modes()

    def attach_network(self, footprint: Footprint) -> None:
        assert footprint.netns is not None
        microvm_net.attach(footprint.netns)

    def host_reaches_ports(self, footprint: Footprint) -> bool:
        # The guest's sockets are in its own kernel: the agent connects for the host.
        return False

    def check_checkpoint(self, spec: SandboxSpec, what: str) -> None:
        super().check_checkpoint(spec, what)
        microvm_net.check_checkpoint(spec.network, what)
        if spec.volumes or spec.rootfs is None:
            shared = "volumes" if spec.volumes else f"the template {spec.template!r}"
            raise IsolationUnavailable(
                f"the microvm tier cannot {what} for a sandbox of {shared}: QEMU cannot "
                "migrate their virtio-fs devices; use a layer template such as `base` "
                "without volumes (copy the files in), or the gvisor tier"
            )

    def cgroup_memory_bytes(self, limits: Limits) -> int:
        """The guest's RAM plus QEMU's own memory."""
        return limits.memory_bytes + (VMM_OVERHEAD_MIB << 20)

    @classmethod
    def probe(cls, settings: Settings) -> Capabilities:
        missing: list[str] = []
        no_shares = microvm_shares.missing()
        details: dict[str, object] = {
            "network": ", ".join(sorted(microvm_net.network_modes())),
            "memory snapshots": "sandboxes with network none, no volumes, of a layer template",
            "volumes": f"no: {no_shares}" if no_shares else "yes (virtio-fs)",
        }
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
            python = guest_runtime(settings.guest_python).python
            details["guest_agent"] = f"{python}, copied with its libraries into the agent image"
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
        host = get_template(spec.template) if layered is None else None
        kernel = guest_kernel.extract(kernel_dir(self.settings))
        initramfs = guest_kernel.initramfs(kernel, self._images)
        if host is None:
            assert layered is not None
            root = root_image(layered, self._images / "roots")
        else:  # its /etc and symlinks; the host's directories come over virtio-fs
            etc = shared_etc(self.settings.runtime_dir, host)
            root = host_root_image(host, etc, self._images / "roots")
        runtime = runtime_image(self.settings.guest_python, self.settings.runtime_dir,
                                self._images / "runtime")  # fmt: skip
        first = idrange.claim(self.settings, footprint)
        limits = spec.limits
        # The guest stores its ids as they are (no idmap): a snapshot maps them 1:1.
        footprint.layer_ids = [0, 0, IDS_PER_SLOT]
        why_not_kvm = kvm_reason(str(kernel.vmlinuz), str(initramfs))
        cmdline = _cmdline(why_not_kvm)
        shares = microvm_shares.host_shares(footprint, host) if host else []
        shares += microvm_shares.volume_shares(footprint, spec.volumes, first)
        if shares:
            cmdline += " corral.virtiofs"  # its init loads the driver
        disk: Path | None = None
        if spec.ram_disk:  # a tmpfs in the guest: its writes are the guest's RAM
            cmdline += f" corral.ramdisk={limits.storage_bytes}"
        else:
            disk = self.settings.data_dir / "disks" / f"{footprint.id}.img"
            disk.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            footprint.record_disk(str(disk))
        workdir = (
            (entrypoint.cwd if entrypoint else None)
            or (layered.workdir if layered else None)
            or "/workspace"
        )
        config = footprint.path / microvm_snapshot.CONFIG_DISK
        cpus = max(1, math.ceil(limits.cpu))
        machine = microvm_snapshot.Machine(
            limits.memory_bytes >> 20, cpus, str(root), str(runtime), ram_disk=disk is None
        )
        if spec.restore is None:
            if disk is not None:
                format_disk(disk, limits.disk_bytes)
            user, env = (layered.user, layered.env) if layered else (SANDBOX_USER, {})
            config.write_bytes(
                _config(footprint.id, user, env, spec, workdir, shares, entrypoint, footprint.netns)
            )
        else:  # the checkpoint's disks, and its runtime image: the guest has it mounted
            machine = microvm_snapshot.restore_files(spec.restore, machine, disk, config)
        machine.record(footprint.path)
        console = footprint.path / "console.log"
        # Memory snapshots (`microvm_snapshot`): the writable disk as open files, which a
        # migration can reopen; a restore reads the checkpoint's memory from another.
        fds, disk_args = microvm_snapshot.writable_disk("corral-disk", disk)
        incoming: list[str] = []
        if spec.restore is not None:
            try:
                memory, incoming = microvm_snapshot.incoming(spec.restore)
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            fds.append(memory)
        if entrypoint is not None:
            microvm_oneshot.make_signal_fifo(footprint)
        argv = [
            QEMU,
            "-M", "microvm,x-option-roms=off",
            *_accel(why_not_kvm),
            "-smp", str(cpus),
            "-m", str(limits.memory_bytes >> 20),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
            "-append", cmdline,
            "-serial", f"file:{console}",
            "-chardev", microvm_oneshot.STDOUT_CHARDEV if entrypoint else AGENT_CHARDEV,
            "-device", "virtio-serial-device",
            "-device", "virtserialport,chardev=agent,name=corral.agent",
            *_disk("corral-runtime", Path(machine.runtime), read_only=True),
            *_disk("corral-root", root, read_only=True),
            *disk_args,
            *_disk("corral-config", config, read_only=True),
            *(microvm_net.qemu_args() if footprint.netns else []),
            "-qmp", f"unix:{footprint.path / microvm_snapshot.QMP_SOCKET},server=on,wait=off",
            "-sandbox", "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
            "-runas", f"{first}:{first}",
            *microvm_snapshot.MIGRATION_ARGS,
            *incoming,
            *microvm_shares.qemu_args(footprint, shares, limits.memory_bytes >> 20),
            *(microvm_oneshot.qemu_args(footprint) if entrypoint else []),
        ]  # fmt: skip
        exit_file = microvm_oneshot.exit_file(footprint) if entrypoint else None
        try:
            argv, shared = microvm_shares.launcher_argv(footprint, shares, first, argv, exit_file)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        fds += shared
        return LaunchPlan(
            argv=argv,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            workdir=workdir,
            host_cwd=str(footprint.path),
            pass_fds=tuple(fds),
            exec_failure=microvm_oneshot.EXEC_FAILURE,
            signal_fifo=microvm_oneshot.signal_fifo(footprint) if entrypoint else None,
            netns=footprint.netns,  # QEMU opens the guest's tap there (`microvm_net`)
        )

    def checkpoint(self, footprint: Footprint, image: Path) -> None:
        microvm_snapshot.checkpoint(footprint, image)

    def clock_command(self) -> list[str] | None:
        return microvm_snapshot.clock_command(f"{GUEST_DIR}/busybox")

    def identity_command(self, hostname: str) -> list[str] | None:
        return microvm_snapshot.identity_command(f"{GUEST_DIR}/busybox", hostname)

    def snapshot_flush(self) -> list[str] | None:
        return [f"{GUEST_DIR}/busybox", "sync"]  # any template: the agent image's busybox

    @contextlib.contextmanager
    def snapshot_files(self, footprint: Footprint) -> Iterator[None]:
        """The sandbox's disk mounted read-only at `rootfs.upper_dir`'s parent while the
        guest is frozen, its writes flushed (`snapshot_flush`); recorded for the reaper."""
        if footprint.disk is None:
            raise SnapshotUnavailable(
                f"sandbox {footprint.id} keeps its files on a RAM disk, in its guest's "
                "memory: snapshot a sandbox made without ram_disk"
            )
        target = footprint.path / "disk"
        target.mkdir(mode=0o700, exist_ok=True)
        if str(target) not in footprint.mounts:
            footprint.record_mount(str(target))
        done = subprocess.run(
            ["mount", "-t", "ext4", "-o", "ro,noload,nosuid,nodev,loop", footprint.disk,
             str(target)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if done.returncode != 0:
            raise SnapshotUnavailable(f"could not read the sandbox's disk: {done.stderr[-300:]}")
        try:
            yield
        finally:
            unmount_overlay(target, lazy=True)  # any mount: a lazy umount2

    def start_failure_detail(self, footprint: Footprint) -> str:
        """The guest's console: what its init and agent said (lines without the kernel's
        timestamp), then the kernel's last words."""
        try:
            with open(footprint.path / "console.log", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        kernel = [line for line in lines if _KERNEL_LINE.match(line)]
        said = [line for line in lines if line.strip() and not _KERNEL_LINE.match(line)]
        return "\n".join(["guest console:", *said[-20:], *kernel[-3:]])


def bare_boot_argv(settings: Settings) -> list[str]:
    """QEMU booting the tier's kernel and initramfs as a sandbox does, with the same
    machine and accelerator, whose init prints `BARE_BOOT_LINE` on stdout and stops the
    VM at once: the raw baseline of a boot (benchmarks)."""
    kernel = guest_kernel.extract(kernel_dir(settings))
    initramfs = guest_kernel.initramfs(kernel, settings.data_dir / "microvm")
    why_not_kvm = kvm_reason(str(kernel.vmlinuz), str(initramfs))
    return [
        QEMU, "-M", "microvm,x-option-roms=off", *_accel(why_not_kvm), "-smp", "1", "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
        "-append", f"{_cmdline(why_not_kvm)} corral.bare", "-serial", "stdio",
    ]  # fmt: skip


BARE_BOOT_LINE = guest_kernel.BARE_BOOT_LINE


def _accel(why_not_kvm: str | None) -> list[str]:
    if why_not_kvm is None:
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", f"tcg,tb-size={TCG_CACHE_MIB}", "-cpu", "max"]


def _cmdline(why_not_kvm: str | None) -> str:
    if why_not_kvm is None:
        return KERNEL_CMDLINE
    return KERNEL_CMDLINE + " " + TCG_CMDLINE.format(khz=_host_tsc_khz())


@functools.cache
def _host_tsc_khz() -> int:
    """The host's TSC frequency in kHz: the kernel's own figure where it exports one,
    else the CPU clock /proc/cpuinfo gives (the TSC's on CPUs with a constant TSC)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return round(float(line.split(":", 1)[1]) * 1000)
    return _DEFAULT_TSC_KHZ


def _disk(serial: str, image: Path, *, read_only: bool) -> list[str]:
    drive = f"if=none,id={serial},file={image},format=raw,cache=unsafe"
    if read_only:
        drive += ",readonly=on"
    return ["-drive", drive, "-device", f"virtio-blk-device,drive={serial},serial={serial}"]


def _config(
    sandbox_id: str,
    user: str,
    template_env: Mapping[str, str],
    spec: SandboxSpec,
    workdir: str,
    shares: list[microvm_shares.Share],
    entrypoint: Entrypoint | None,
    netns: str | None,
) -> bytes:
    """The configuration disk `corral.guest.vm_boot` reads (padded to whole sectors); with
    a network (`netns`), the guest's addresses as a last field."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        **template_env,
        **spec.env,
        **(entrypoint.env if entrypoint else {}),
    }
    argv, files = microvm_oneshot.fields(entrypoint)
    fields = [sandbox_id.replace("_", "-"), user, workdir, str(len(argv)), *argv]
    fields += microvm_shares.mount_fields(shares) + files
    fields += [f"{key}={value}" for key, value in env.items()]
    if netns is not None:
        fields.append(microvm_net.guest_config())
    payload = "\0".join(fields).encode()
    data = _CONFIG_MAGIC + f"{len(payload)}\n".encode() + payload
    return data + b"\0" * (-len(data) % 512)
