"""Host directories a microVM guest mounts live: named volumes and the `host` template's /usr.

virtio-fs, served by QEMU's `virtiofsd` (Debian 12: /usr/lib/qemu/virtiofsd, in
qemu-system-common, which qemu-system-x86 depends on), one daemon per shared directory,
the guest's `virtiofs` driver (a module of the cloud kernel). Why not 9p: the cloud
kernel has no 9p at all (the full `linux-image-amd64` would be a second, larger kernel to
fetch and boot), and QEMU's built-in 9p server would run inside QEMU, as its `-runas`
uid: it could not honour the owners the volume stores (no CAP_CHOWN), and a bug in it is
a bug in the VMM itself. virtiofsd is a separate, small process that can be boxed alone.

Each daemon:
- runs as root of the sandbox's user namespace (`idrange`: host ids first..first+65535,
  the same unprivileged ids as QEMU and the namespace tier's sandbox), so it can act as
  any of the guest's users on the volume and on nothing of the host's but what every
  user may read (the host's /usr, read-only);
- serves a mount that is already bounded on the host: a volume's idmapped mount
  (`corral.isolation.volumes.attach`, read-only when asked: then a guest's root cannot
  write either, the mount is read-only under the daemon, which cannot remount it), or a
  read-only bind of the host directory;
- sandboxes itself (`sandbox=namespace`: new mount, pid and net namespaces, pivot_root
  into the shared directory, so `..` and symlinks resolve within it; its own seccomp
  filter; capabilities trimmed);
- is started by the sandbox's launcher (so it is in the sandbox's cgroup and counted in
  its memory), killed with it: the launcher's shell stops it when QEMU exits, destroying
  the cgroup kills it otherwise, and the reaper does that for a dead server.
Cache: `none` for volumes, which other sandboxes (of any tier) write at the same time —
a write is seen at once by every reader, at the cost of a round trip per operation;
`always` for the read-only host directories, which no sandbox writes.

Measured (`benchmarks/microvm_shares.py`, TCG, 2 shared cores, load 1.3-2.5, p50 of 3):
a `host` sandbox starts as fast as a layer template's (4.9 s vs 6.0 s to first output,
noise-bound) and `python3 -c pass` from the host's /usr takes 934 ms vs 869 ms from an
image; a volume writes 64 MiB at 146 MiB/s and reads at 362 MiB/s (the sandbox's own
virtio-blk disk: 53 / 91 — the host does a share's I/O at native speed), but creating
1000 empty files takes 2.4 s vs 0.6 s (cache=none: a round trip each); a daemon's RSS is
~12 MiB, counted in the sandbox's cgroup.

vhost-user devices need the guest's RAM in shared memory (a memfd), so a VM with shares
has its RAM in one; QEMU cannot migrate a vhost-user-fs device, so such a sandbox has no
memory snapshots (refused before anything changes: `check_checkpoint`).
"""

from __future__ import annotations

import ctypes
import os
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corral.errors import IsolationUnavailable
from corral.isolation import idrange
from corral.isolation.footprint import Footprint
from corral.isolation.launcher import nsenter, setpriv
from corral.isolation.templates import Template
from corral.isolation.volumes import VolumeMount
from corral.isolation.volumes import attach as attach_volume

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
_libc = ctypes.CDLL(None, use_errno=True)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 32, 4096, 16384
# The guest's RAM as a shared memory file (vhost-user maps it in the daemons).
MEMORY_ID = "corral-mem"


@dataclass(frozen=True)
class Share:
    """A host directory mounted in the guest at `path` by the virtio-fs `tag`."""

    tag: str
    source: Path
    path: str
    read_only: bool
    cache: str  # virtiofsd's cache mode: "none" (shared live) or "always" (read-only)
    # The template's own tree (the host's /usr): mounted first in the guest, before its
    # boot looks for a shell; volumes last, over what the boot made.
    base: bool = False


def missing() -> str | None:
    """Why this host cannot share directories with a guest, None when it can."""
    if not os.access(VIRTIOFSD, os.X_OK):
        return f"{VIRTIOFSD} (virtio-fs, for volumes): apt-get install qemu-system-common"
    return None


def volume_shares(footprint: Footprint, volumes: Sequence[VolumeMount], first: int) -> list[Share]:
    """Attach each volume for the sandbox (its ids start at host id `first`) as the
    namespace tier does (`corral.isolation.volumes.attach`): the shares serving them."""
    if volumes and (why := missing()):
        raise IsolationUnavailable(f"the microvm tier cannot mount volumes here: {why}")
    shares = []
    for index, volume in enumerate(volumes):
        mount = attach_volume(footprint, index, volume, first)
        shares.append(Share(f"corral-vol{index}", mount, volume.path, volume.read_only, "none"))
    return shares


def host_shares(footprint: Footprint, template: Template) -> list[Share]:
    """The host directories the namespace tier binds read-only for `template` (the
    `host` template's /usr), each bound read-only, nosuid and nodev in the footprint
    (recorded: released with it) for its daemon to serve: a daemon that cannot write
    there whatever a bug makes it try, as the namespace tier's bind."""
    if template.ro_binds and (why := missing()):
        raise IsolationUnavailable(f"the microvm tier cannot run the host template here: {why}")
    places = footprint.path / "host"
    places.mkdir(mode=0o711, exist_ok=True)  # the daemons run as the sandbox's uid
    shares = []
    for index, (source, path) in enumerate(template.ro_binds):
        target = places / str(index)
        target.mkdir(mode=0o755)
        footprint.record_mount(str(target))
        flags = _MS_BIND | _MS_REC
        if _libc.mount(source.encode(), str(target).encode(), None, flags, None) or _libc.mount(
            None, str(target).encode(), None,
            _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None,
        ):  # fmt: skip
            error = os.strerror(ctypes.get_errno())
            raise IsolationUnavailable(f"could not bind {source} for the guest: {error}")
        shares.append(Share(f"corral-host{index}", target, path, True, "always", base=True))
    return shares


def mount_fields(shares: Sequence[Share]) -> list[str]:
    """The shares as the guest's boot reads them (`corral.guest.vm_boot`): a count, then
    tag, path and `base` (the template's tree), `ro` or `rw` of each."""
    fields = [str(len(shares))]
    for share in shares:
        fields += [share.tag, share.path, _mode(share)]
    return fields


def _mode(share: Share) -> str:
    return "base" if share.base else "ro" if share.read_only else "rw"


def qemu_args(footprint: Footprint, shares: Sequence[Share], memory_mib: int) -> list[str]:
    """QEMU's options for `shares`: the guest's RAM in a shared memfd, then a
    vhost-user-fs device per share, on the daemon's socket (`listen`)."""
    if not shares:
        return []
    args = [
        "-object", f"memory-backend-memfd,id={MEMORY_ID},size={memory_mib}M,share=on",
        "-machine", f"memory-backend={MEMORY_ID}",
        # virtiofsd serves virtio 1.0 devices only; microvm's virtio-mmio is legacy by
        # default (kept so without shares: a checkpoint's devices must stay the same).
        "-global", "virtio-mmio.force-legacy=false",
    ]  # fmt: skip
    for share in shares:
        args += ["-chardev", f"socket,id={share.tag},path={_socket_path(footprint, share)}"]
        args += ["-device", f"vhost-user-fs-device,chardev={share.tag},tag={share.tag}"]
    return args


def _socket_path(footprint: Footprint, share: Share) -> Path:
    return footprint.path / f"{share.tag}.sock"


def listen(footprint: Footprint, shares: Sequence[Share]) -> list[int]:
    """A listening socket per share, at the path QEMU connects to: made before either
    process starts, so QEMU's connection waits in the backlog for its daemon (no race).
    The caller closes the fds (once the launcher has them)."""
    fds: list[int] = []
    try:
        for share in shares:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.append(sock.detach())
            with socket.socket(fileno=os.dup(fds[-1])) as bound:
                bound.bind(str(_socket_path(footprint, share)))
                bound.listen(1)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def daemon_commands(
    footprint: Footprint, shares: Sequence[Share], sockets: Sequence[int], first: int, userns: int
) -> list[str]:
    """Shell commands (for the launcher's script) starting a virtiofsd per share in the
    background, as root of the sandbox's user namespace (the fd `userns`), each serving
    its share on its listening socket; their pids are appended to `$daemons`."""
    lines = []
    tool = setpriv() or "setpriv"
    for share, fd in zip(shares, sockets, strict=True):
        options = f"source={share.source},sandbox=namespace,cache={share.cache},log_level=err"
        argv = [
            tool, f"--reuid={first}", f"--regid={first}", "--clear-groups", "--",
            nsenter(), f"--user=/proc/self/fd/{userns}", "--",
            VIRTIOFSD, f"--fd={fd}", "-o", options, "--rlimit-nofile=0",
        ]  # fmt: skip
        log = footprint.path / f"{share.tag}.log"
        command = " ".join(shlex.quote(a) for a in argv)
        # ({err}: the launcher's stderr, `launcher_script`'s, not theirs)
        lines.append(f"{command} </dev/null >/dev/null 2>{shlex.quote(str(log))} {{err}}>&- &")
        lines.append('daemons="$daemons $!"')
    return lines


def launcher_script(
    daemons: Sequence[str], close_fds: Sequence[int], exit_file: Path | None = None
) -> str:
    """The shell the launcher runs (its argv follows: QEMU's): the daemons started, the
    fds only they need closed, QEMU run (not exec'd: the shell waits to stop the daemons
    when it exits). Its status is QEMU's, or with `exit_file` (a one-shot sandbox) the
    guest command's, which the guest wrote there: QEMU exits 0 when the guest stops."""
    closing = " ".join(f"{fd}<&-" for fd in close_fds)
    # bash's own stderr goes nowhere (it reports a killed QEMU there), QEMU's is the caller's.
    lines = ["exec {err}>&2 2>/dev/null", "daemons=", *daemons]
    lines += [f"exec {closing}" if closing else ":", '"$@" 2>&$err {err}>&-', "status=$?"]
    lines.append('[ -z "$daemons" ] || kill -9 $daemons 2>/dev/null')
    if exit_file is not None:
        lines += [
            '[ "$status" = 0 ] || exit "$status"',  # QEMU killed (a timeout, a kill)
            f"read -r code < {shlex.quote(str(exit_file))} || code=",
            'case "$code" in',
            '  [0-9] | [0-9][0-9] | [0-9][0-9][0-9]) exit "$code" ;;',
            "esac",
            "echo 'corral-vm: the guest stopped before its command ended' "
            "'(its console says why)' >&$err",
            "exit 125",
        ]
    else:
        lines.append('exit "$status"')
    return "\n".join(lines)


def launcher_argv(
    footprint: Footprint,
    shares: Sequence[Share],
    first: int,
    qemu: list[str],
    exit_file: Path | None = None,
) -> tuple[list[str], list[int]]:
    """The launcher's argv for QEMU's `qemu` with `shares` served (and, for a one-shot
    sandbox, its status read from `exit_file`), and the fds it must inherit (the caller
    closes them once it is launched): QEMU's argv alone when there is neither."""
    if not shares and exit_file is None:
        return qemu, []
    fds: list[int] = []
    daemons: list[str] = []
    try:
        if shares:
            fds.append(idrange.range_userns(first, 0)())
            sockets = listen(footprint, shares)
            fds += sockets
            daemons = daemon_commands(footprint, shares, sockets, first, fds[0])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    script = launcher_script(daemons, fds, exit_file)
    # bash: dash cannot close an fd above 9.
    return ["/bin/bash", "-c", script, "corral-vm", *qemu], fds
