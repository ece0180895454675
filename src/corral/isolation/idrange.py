"""A sandbox's range of host ids and the user namespace that maps it (root mode).

Slot N of `Settings.uid_slots` owns host ids [uid_base + N*65536, +65536): the sandbox's
uids 0-65535, so `root` and `user` (1000) inside are two unprivileged host ids, and the
files its root creates belong to the first one. Corral makes the user namespace that maps
the range ("0 FIRST 65536") itself — bubblewrap maps one id only — and uses it twice: to
idmap the template's layers (`corral.isolation.rootfs`) and, passed with `--userns`, as
the sandbox's own. The namespace's owner is the host id the launcher runs as: owning it
is what lets bubblewrap, unprivileged, enter it and make the sandbox's mounts.

bubblewrap refuses `--disable-userns` with `--userns`, so the namespace is made unable to
hold further user namespaces the way that option does it: its `max_user_namespaces` is 0
(set from inside, as its root, before any sandbox uses it; changing it back needs
CAP_SYS_RESOURCE there, which no sandbox keeps). The seccomp filter refuses them too.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from corral.config import IDS_PER_SLOT, Settings
from corral.errors import SandboxStartFailed
from corral.isolation.launcher import nsenter, setpriv

if TYPE_CHECKING:
    from corral.isolation.footprint import Footprint

# Namespaces by (first id, owner): each costs three processes to make (~5-10 ms), and a
# slot is reused by later sandboxes (`kept_slots`: they prefer these). Bounded; an evicted
# one is closed. Reusing one is no new sharing: a slot's sandboxes share its host ids.
_kept: OrderedDict[tuple[int, int], int] = OrderedDict()
_lock = threading.Lock()
_KEPT = 256


def claim(settings: Settings, footprint: Footprint) -> int:
    """Take a uid slot for the sandbox of `footprint` (one this process keeps a namespace
    for, if free) and give its first host id."""
    slot = footprint.claim_uid_slot(
        settings.runtime_dir, settings.uid_base, settings.uid_slots, kept_slots(settings)
    )
    return first_id(settings, slot)


def first_id(settings: Settings, slot: int) -> int:
    """The host id that is uid and gid 0 of the sandbox in uid slot `slot`."""
    return settings.uid_base + slot * IDS_PER_SLOT


def kept_slots(settings: Settings) -> list[int]:
    """The uid slots whose namespace (for the agent: owner 0) this process keeps, most
    recently used first: a sandbox that takes one of them skips making it."""
    with _lock:
        firsts = [first for first, owner in reversed(_kept) if owner == 0]
    offsets = (first - settings.uid_base for first in firsts)
    return [offset // IDS_PER_SLOT for offset in offsets if offset % IDS_PER_SLOT == 0]


def range_userns(first: int, owner: int) -> Callable[[], int]:
    """Start getting a user namespace mapping ids 0-65535 to host `first`.., owned by
    host id `first + owner`; the function returned waits for it and gives an fd the
    caller closes (a new one at each call). Kept for the next sandbox of that slot."""
    key = (first, owner)

    def kept() -> int:  # a new fd of the kept one (or of a new one, if evicted meanwhile)
        with _lock:
            if (fd := _kept.get(key)) is not None:
                return os.dup(fd)
        return range_userns(first, owner)()

    with _lock:
        if key in _kept:
            _kept.move_to_end(key)
            return kept
    tool = setpriv() or "setpriv"
    host = str(first + owner)
    child = subprocess.Popen(
        [tool, f"--reuid={host}", f"--regid={host}", "--clear-groups",
         "unshare", "--user", "sh", "-c", "echo; read x"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip

    waited = False

    def finish() -> int:
        nonlocal waited
        if waited:
            return kept()
        waited = True
        fd = _map(child, first)
        with _lock:
            if (made := _kept.setdefault(key, fd)) != fd:
                os.close(fd)  # another thread made one meanwhile
            while len(_kept) > _KEPT:
                os.close(_kept.popitem(last=False)[1])
            return os.dup(made)

    return finish


def _map(child: subprocess.Popen[bytes], first: int) -> int:
    """Map the range in the namespace of `child` (an `unshare --user` that prints a line
    once in it, then waits for its stdin to close), forbid nested namespaces; its fd."""
    with child:
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdout.readline()  # in its namespace now
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{child.pid}/{name}", "w") as f:
                    f.write(f"0 {first} {IDS_PER_SLOT}\n")
            fd = os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SandboxStartFailed(f"could not make the sandbox's id mapping: {exc}") from exc
        finally:
            child.stdin.close()  # it exits; leaving `with` waits for it
    try:
        done = subprocess.run(
            [nsenter(), f"--user=/proc/self/fd/{fd}", "sh", "-c",
             "echo 0 > /proc/sys/user/max_user_namespaces"],
            pass_fds=(fd,), capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if done.returncode != 0:
            raise SandboxStartFailed(
                f"could not forbid nested user namespaces: {done.stderr.strip()[-300:]}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd
