"""Memory snapshots of microvm sandboxes: QEMU migration to a file, and back.

`checkpoint` stops the guest's vCPUs, migrates the machine (RAM and device state) over a
pipe to the host, which writes `<image>/memory`, makes QEMU exit, and moves the sandbox's
writable disk and its configuration disk into the image: the directory is then the whole
sandbox. A restore puts copies of those disks where the new sandbox's disks go
(`restore_files`) and starts the same machine with `-incoming fd:N` reading the memory
file (`incoming`). Every microvm QEMU runs with `MIGRATION_ARGS`: the run state is left
out of the stream, so the restored machine runs as soon as it is loaded (the source was
stopped, and a migrated "paused" state would wait for a `cont` nobody sends).

A pipe rather than a file QEMU writes itself: QEMU runs as the sandbox's unprivileged uid
under its RLIMIT_FSIZE (`Limits.file_size_mib`), which a large guest memory may exceed,
and under `-sandbox spawn=deny`, so `exec:` migration is out too.

What the guest has mounted must be the same blocks after a restore: the template's root
image and the guest runtime image are recorded (`Machine`, `machine.json` beside the
QEMU of every sandbox and in every checkpoint) and a restore uses the recorded ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import select
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidRequest, SandboxError, SandboxStartFailed
from corral.isolation.footprint import Footprint
from corral.isolation.qmp import Qmp

MIGRATION_ARGS = ("-global", "migration.store-global-state=off")
QMP_SOCKET = "qmp.sock"
CONFIG_DISK = "config.img"
MACHINE = "machine.json"
_MEMORY = "memory"
_DISK = "disk.img"
# Writing a large guest memory to a slow disk takes a while; past this, it failed.
CHECKPOINT_TIMEOUT = 300.0
# The guest is stopped: nothing to converge, so the only cap is the disk's speed
# (QEMU's default, 128 MiB/s, made a 256 MiB guest take 0.6 s instead of 0.13 s).
_BANDWIDTH = 1 << 40
_FD_NAME = "corral-checkpoint"
# The fd set (`-add-fd`) of the writable disk.
_FDSET = 1


@dataclass(frozen=True)
class Machine:
    """What a restore must match (memory, CPUs, the template's root image) or reuse
    (the guest runtime image, whose blocks the guest has mounted)."""

    memory_mib: int
    cpus: int
    root: str
    runtime: str
    ram_disk: bool = False  # its writable files in its RAM (`SandboxSpec.ram_disk`): no disk

    def record(self, directory: Path) -> None:
        (directory / MACHINE).write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def read(cls, directory: Path) -> Machine:
        try:
            fields = json.loads((directory / MACHINE).read_text())
            return cls(**fields)
        except (OSError, ValueError, TypeError) as exc:
            raise InvalidRequest(
                f"{str(directory)!r} is not a microvm checkpoint ({MACHINE}: {exc}); give "
                "a directory `Sandbox.checkpoint` wrote for a microvm sandbox"
            ) from None


def checkpoint(footprint: Footprint, image: Path) -> None:
    """Write the running microvm of `footprint` into the empty directory `image`; QEMU
    has exited when this returns. Raises SandboxError (QmpError) when it could not."""
    directory = footprint.path
    with Qmp(directory / QMP_SOCKET) as qmp:
        qmp.command("migrate-set-parameters", {"max-bandwidth": _BANDWIDTH})
        qmp.command("stop")
        reader, writer = os.pipe2(os.O_CLOEXEC)
        try:
            qmp.command("getfd", {"fdname": _FD_NAME}, fds=[writer])
            os.close(writer)
            writer = -1
            qmp.command("migrate", {"uri": f"fd:{_FD_NAME}"})
            _drain(reader, image / _MEMORY, time.monotonic() + CHECKPOINT_TIMEOUT)
        finally:
            os.close(reader)
            if writer >= 0:
                os.close(writer)
        status = qmp.command("query-migrate")
        if status.get("status") != "completed":
            detail = status.get("error-desc") or status.get("status")
            raise SandboxError(f"QEMU could not write sandbox {footprint.id}'s memory: {detail}")
        # Its disks are consistent now (a completed migration flushes them); once QEMU is
        # gone they are only the checkpoint's.
        qmp.quit(timeout=30)
    if footprint.disk is not None:  # else its files are in its memory (ram_disk)
        _move(Path(footprint.disk), image / _DISK)
    _move(directory / CONFIG_DISK, image / CONFIG_DISK)
    Machine.read(directory).record(image)


def _drain(reader: int, target: Path, deadline: float) -> None:
    """Copy what QEMU writes to the pipe `reader` into `target` until it closes it."""
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        poll = select.poll()
        poll.register(reader, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poll.poll(left * 1000):
                raise SandboxError(f"QEMU did not write its memory within {CHECKPOINT_TIMEOUT:g} s")
            if os.splice(reader, out, 1 << 20) == 0:
                return
    finally:
        os.close(out)


def _move(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy(source, target)
        source.unlink()


def _copy(source: Path, target: Path) -> None:
    """A copy that stays sparse (a disk image is mostly holes), shared blocks if it can."""
    done = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", "--no-preserve=all", str(source), str(target)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        raise SandboxStartFailed(f"could not copy {source}: {done.stderr.strip()[-300:]}")
    os.chmod(target, 0o600)


def restore_files(image: Path, machine: Machine, disk: Path | None, config: Path) -> Machine:
    """Check that the checkpoint `image` fits the machine a spec asks for (`machine`),
    put copies of its disks at `disk` (None: a RAM disk) and `config`, and return the
    machine to start: the checkpoint's, whose runtime image the guest has mounted."""
    saved = Machine.read(image)
    if dataclasses.replace(machine, runtime=saved.runtime) != saved:
        raise InvalidRequest(
            f"the checkpoint {str(image)!r} is of a microvm with {saved.memory_mib} MiB, "
            f"{saved.cpus} CPUs, ram_disk={saved.ram_disk} and its template's root image; "
            f"asked: {machine.memory_mib} MiB, {machine.cpus} CPUs, ram_disk="
            f"{machine.ram_disk}{'' if machine.root == saved.root else ', another template'}:"
            " restore it with the template and limits it was created with"
        )
    if not Path(saved.runtime).is_file():
        raise SandboxStartFailed(
            f"the guest runtime image the checkpoint {str(image)!r} was made with is gone "
            f"({saved.runtime}); its sandbox cannot be restored"
        )
    if disk is not None:
        _copy(image / _DISK, disk)
    _copy(image / CONFIG_DISK, config)
    return saved


def incoming(image: Path) -> tuple[int, list[str]]:
    """An open file descriptor of the checkpoint's memory (for `LaunchPlan.pass_fds`)
    and the QEMU arguments that restore the machine from it."""
    fd = os.open(image / _MEMORY, os.O_RDONLY | os.O_CLOEXEC)
    return fd, ["-incoming", f"fd:{fd}"]


def writable_disk(serial: str, image: Path | None) -> tuple[list[int], list[str]]:
    """Open files of the sandbox's writable disk `image` (for `LaunchPlan.pass_fds`) and
    the QEMU arguments of a virtio-blk disk named `serial` made of them; none without a
    disk (a RAM disk).

    Files, not a path: a migration hands the disk over by reopening it (read-only when
    the source lets go, read-write when the destination takes it), after QEMU has dropped
    to the sandbox's uid (`-runas`), which cannot open a path under the data dir. QEMU
    takes a reopened file from the fd set, one per access mode."""
    if image is None:
        return [], []
    fds = [os.open(image, os.O_RDWR | os.O_CLOEXEC)]
    try:
        fds.append(os.open(image, os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        os.close(fds[0])
        raise
    fdset = _FDSET
    argv = [arg for fd in fds for arg in ("-add-fd", f"fd={fd},set={fdset}")]
    drive = f"if=none,id={serial},file=/dev/fdset/{fdset},format=raw,cache=unsafe"
    argv += ["-drive", drive, "-device", f"virtio-blk-device,drive={serial},serial={serial}"]
    return fds, argv


def clock_command(busybox: str) -> list[str]:
    """Set the guest's clock to the host's now: it stood still while the guest was on
    disk (its kernel keeps its own time; no RTC is read after a restore). Busybox's
    `date` (the agent image's), as any template may lack one."""
    return [busybox, "date", "-u", "-s", f"@{round(time.time())}"]


def identity_command(busybox: str, hostname: str) -> list[str]:
    """Name the guest `hostname` as its boot did (`corral.guest.vm_boot`): the kernel's
    host name, /etc/hostname and /etc/hosts, which a checkpoint restored into a new
    sandbox has of the one checkpointed."""
    script = (
        '"$0" hostname "$1" && echo "$1" > /etc/hostname && '
        "printf '127.0.0.1\\tlocalhost %s\\n::1\\tlocalhost\\n' \"$1\" > /etc/hosts"
    )
    return [busybox, "sh", "-c", script, busybox, hostname]
