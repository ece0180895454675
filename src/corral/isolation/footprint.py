"""What a sandbox leaves on the host, recorded so it can always be cleaned up.

Each sandbox owns a directory under ``<runtime_dir>/sandboxes/<id>`` with a ``state.json``
written *before* anything else is created (cgroup, tmpfs mount, uid slot). The record names
its owner (host pid + process start time), so after the owner died — even by SIGKILL — the
reaper of any other process (at its start, then periodically) knows which leftovers are
orphans and removes exactly those.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from corral.errors import SandboxStartFailed
from corral.images import LayerStore
from corral.isolation import netns

log = logging.getLogger("corral.isolation")

_libc = ctypes.CDLL(None, use_errno=True)
_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def process_alive(pid: int, start_time: int) -> bool:
    """Whether process `pid` is the one that started at `start_time` (pids are reused)."""
    return process_start_time(pid) == start_time


@dataclass
class Footprint:
    """The record of one sandbox's host resources; `state.json` mirrors it."""

    id: str
    backend: str
    path: Path
    owner_pid: int = field(default_factory=os.getpid)
    owner_start: int = 0
    cgroup: str | None = None
    mounts: list[str] = field(default_factory=list)
    uid_slot: int | None = None
    uid_slots_dir: str | None = None
    # Its entry in the host's memory ledger (`admission.MemoryLedger`), removed on release.
    memory_entry: str | None = None
    # Its network namespace (a bind-mounted nsfs file), the host end of its veth and its
    # slot in the address pool, when it has an uplink (`corral.isolation.netns`).
    netns: str | None = None
    veth: str | None = None
    net_slot: int | None = None
    net_slots_dir: str | None = None
    # Without root: the user namespace owning `netns` (`corral.isolation.usernet`), and
    # the processes that hold and feed them (holder, slirp4netns), as [pid, start time].
    userns: str | None = None
    processes: list[list[int]] = field(default_factory=list)
    # The image file of its disk (a layer template's sandbox, `corral.isolation.rootfs`).
    disk: str | None = None
    # Its layers' id mapping, [host uid, host gid, count]: an id x < count stored in a layer
    # is host id uid+x (gid+x) on its disk and its idmapped layers (a snapshot maps back).
    layer_ids: list[int] | None = None
    # The layer store whose layers its root is made of, and their digests: it holds them
    # there (refs/) until released, so a layer GC never takes a mounted layer.
    layer_store: str | None = None
    layer_digests: list[str] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        runtime_dir: Path,
        sandbox_id: str,
        backend: str,
        cgroup: str | None = None,
        memory_entry: str | None = None,
    ) -> Footprint:
        """The record of a new sandbox, saved; `cgroup` names the one it is about to get."""
        root = runtime_dir / "sandboxes"
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        path = root / sandbox_id
        path.mkdir(mode=0o711)
        fp = cls(
            sandbox_id,
            backend,
            path,
            owner_start=process_start_time(os.getpid()) or 0,
            cgroup=cgroup,
            memory_entry=memory_entry,
        )
        fp.save()
        return fp

    def save(self) -> None:
        # Written several times per sandbox creation, so kept cheap: no deep copies, one write.
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["path"] = str(self.path)
        tmp = f"{self.path}/state.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(record).encode())
        finally:
            os.close(fd)
        os.replace(tmp, f"{self.path}/state.json")

    @classmethod
    def load(cls, path: Path) -> Footprint | None:
        try:
            record = json.loads((path / "state.json").read_text())
            record["path"] = Path(record["path"])
            return cls(**record)
        except (OSError, ValueError, TypeError):
            return None

    def owner_alive(self) -> bool:
        return process_alive(self.owner_pid, self.owner_start)

    # -- resources ----------------------------------------------------------------------

    def mount_tmpfs(
        self, target: Path, size_bytes: int, uid: int, gid: int, mode: int = 0o700
    ) -> None:
        """A size-bounded tmpfs owned by `uid`: the sandbox's whole writable storage."""
        target.mkdir(mode=0o700, exist_ok=True)
        self.record_mount(str(target))  # first: a crash right after mounting still unmounts
        options = f"size={size_bytes},mode={mode:o},uid={uid},gid={gid}".encode()
        if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options):
            err = ctypes.get_errno()
            raise SandboxStartFailed(f"could not mount the sandbox's storage: {os.strerror(err)}")

    def record_mount(self, target: str) -> None:
        """Record a mount about to be made at `target`: release unmounts it (last first)."""
        self.mounts.append(target)
        self.save()

    def record_mounts(self, targets: Sequence[str], disk: str | None = None) -> None:
        """Record mounts about to be made, in the order they will be (and a disk image
        with them), in one write: unmounting one not made yet is harmless."""
        self.mounts.extend(targets)
        if disk is not None:
            self.disk = disk
        self.save()

    def record_disk(self, image: str) -> None:
        """Record a disk image about to be made: release removes it after the unmounts."""
        self.disk = image
        self.save()

    def hold_layers(self, store: LayerStore, digests: Sequence[str]) -> None:
        """Hold the layers `digests` of `store` for this sandbox (recorded first: release
        lets go of them, even after a crash)."""
        self.layer_store, self.layer_digests = str(store.root), list(digests)
        self.save()
        for digest in digests:
            store.reference(digest, self.id)

    def claim_uid_slot(
        self, runtime_dir: Path, uid_base: int, count: int, preferred: Sequence[int] = ()
    ) -> int:
        """Take a free slot in [0, count) of the ranges from `uid_base`, one of `preferred`
        if one is free: one range of unprivileged host ids per live sandbox. Installs that
        share a base share its registry, so none hands out another's range."""
        slots_dir = uid_slots_dir(runtime_dir, uid_base)
        slot = _claim_slot(
            slots_dir, count, self.path, "sandbox uids", "CORRAL_UID_SLOTS", preferred
        )
        self.uid_slot, self.uid_slots_dir = slot, str(slots_dir)
        self.save()
        return slot

    def claim_net_slot(self, runtime_dir: Path, count: int) -> int:
        """Take a free slot in [0, count) of the sandboxes' address pool."""
        slots_dir = _host_slots(runtime_dir, "net")
        slot = _claim_slot(slots_dir, count, self.path, "sandbox network addresses", "")
        self.net_slot, self.net_slots_dir = slot, str(slots_dir)
        self.save()
        return slot

    def release(self) -> None:
        """Remove the network, unmount, free the slots and remove the directory. Idempotent."""
        for target in reversed(self.mounts):
            if _libc.umount2(target.encode(), _MNT_DETACH) and ctypes.get_errno() not in (
                errno.EINVAL,
                errno.ENOENT,
            ):
                log.warning("could not unmount %s: %s", target, os.strerror(ctypes.get_errno()))
        if self.disk is not None:
            # Unmounted (lazily) above; the loop device lets go of it with its last user.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.disk)
        for pid, start in self.processes:
            if process_alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.netns or self.veth:
            try:
                netns.remove(self.netns, self.veth)
            except OSError as exc:
                log.warning("could not remove the network of sandbox %s: %s", self.id, exc)
        slots = ((self.uid_slot, self.uid_slots_dir), (self.net_slot, self.net_slots_dir))
        for slot, slots_dir in slots:
            if slot is not None and slots_dir:
                _free_slot(Path(slots_dir) / str(slot), self.path)
        if self.memory_entry is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.memory_entry)
        if self.layer_store is not None and os.path.isdir(self.layer_store):
            store = LayerStore(Path(self.layer_store))
            for digest in self.layer_digests:
                with contextlib.suppress(OSError):
                    store.release(digest, self.id)
        shutil.rmtree(self.path, ignore_errors=True)


def uid_slots_dir(runtime_dir: Path, uid_base: int) -> Path:
    """The registry of the uid ranges from `uid_base` (`_host_slots`)."""
    return _host_slots(runtime_dir, f"uids-{uid_base}")


def _host_slots(runtime_dir: Path, name: str) -> Path:
    """The registry of slots `name` of a resource every sandbox on this host draws from:
    as root, host uid ranges and the uplink's address pool are the host's, so one registry
    under /run serves every runtime dir (two installs, a test's servers); without root the
    runtime dir's own, as neither is the host's then (nor is /run writable)."""
    return (Path("/run/corral/host-slots") if os.geteuid() == 0 else runtime_dir) / name


def _claim_slot(
    slots_dir: Path,
    count: int,
    owner: Path,
    what: str,
    setting: str,
    preferred: Sequence[int] = (),
) -> int:
    """A free slot in [0, count) of `slots_dir`: one of `preferred` if free, else tried
    from a random start. A slot taken is a symlink to its owner's footprint directory
    (atomic across processes, and it names who holds it): a slot whose owner's directory
    is gone was left by a runtime dir removed with its footprints, and is taken over."""
    slots_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    holder = str(owner.absolute())
    start = int.from_bytes(os.urandom(4), "big") % count
    for slot in itertools.chain(
        (p for p in preferred if 0 <= p < count), ((start + i) % count for i in range(count))
    ):
        entry = slots_dir / str(slot)
        try:
            os.symlink(holder, entry)
        except FileExistsError:
            if not _take_over(entry, holder):
                continue
        return slot
    raise SandboxStartFailed(
        f"all {count} {what} are in use; destroy sandboxes"
        + (f" or raise {setting}" if setting else "")
    )


def _take_over(entry: Path, holder: str) -> bool:
    """Give `entry` to `holder` if its owner's directory is gone. A footprint's directory
    goes only after its release freed its slots, so a slot outliving it has no owner left
    to free it. One taker at a time (the registry's lock): two that both saw it stale must
    not both replace it."""
    owner = slot_holder(entry)
    if not owner or os.path.isdir(owner):
        return False
    with try_lock(entry.parent / ".lock", os.O_CREAT) as locked:
        if not locked or slot_holder(entry) != owner:  # no owner's directory comes back
            return False
        log.warning("uid or address slot %s was left by %s, which is gone: reused", entry, owner)
        os.unlink(entry)
        try:
            os.symlink(holder, entry)
        except FileExistsError:  # a claim without the lock was quicker: it is its slot
            return False
        return True


def slot_holder(entry: Path) -> str | None:
    """The footprint directory (absolute) that slot `entry` names: None if it is free,
    "" if it is not a symlink (the directory an older Corral made per slot, freed by its
    footprint)."""
    try:
        return os.readlink(entry)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return ""
        raise


def _free_slot(entry: Path, owner: Path) -> None:
    """Free slot `entry` if `owner` holds it (a released footprint's slot may be
    someone else's by now)."""
    holder = slot_holder(entry)
    if holder == str(owner.absolute()):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)
    elif holder == "":
        with contextlib.suppress(OSError):
            os.rmdir(entry)


# A sandbox directory gets its record within milliseconds of being made.
_UNFINISHED_GRACE = 60.0


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def orphans(runtime_dir: Path) -> Iterator[Footprint]:
    """Footprints in `runtime_dir` whose owner process is gone, each yielded while this
    process holds a lock on it: several live processes reap the same runtime dir, and two
    releasing one footprint at once could free a uid slot that a new sandbox just took."""
    root = runtime_dir / "sandboxes"
    if not root.is_dir():
        return
    for path in root.iterdir():
        fp = Footprint.load(path)
        if fp is None:
            # A directory without a readable record was never fully created: nothing in it
            # was mounted (the record is written before any mount), so it can go — once it
            # is old enough not to be one that another process is creating right now.
            with contextlib.suppress(FileNotFoundError):
                unfinished = (path / "state.json.tmp").exists() or not any(path.iterdir())
                if unfinished and _age(path) > _UNFINISHED_GRACE:
                    shutil.rmtree(path, ignore_errors=True)
            continue
        if fp.owner_alive():
            continue
        with try_lock(path) as locked:
            # Read again under the lock: gone if another reaper released it meanwhile.
            if locked and (fp := Footprint.load(path)) is not None:
                yield fp


@contextlib.contextmanager
def try_lock(path: Path, flags: int = os.O_DIRECTORY) -> Iterator[bool]:
    """An exclusive flock on `path` (a directory, or with `flags` e.g. O_CREAT a lock
    file), False if another holder has it (or it is gone). A new open file each time:
    flock excludes open files, so threads of one process exclude each other too; and the
    kernel drops it when its holder dies, so a crashed one blocks nothing."""
    try:
        fd = os.open(path, os.O_RDONLY | flags, 0o600)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
