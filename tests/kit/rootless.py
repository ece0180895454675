"""Running an engine as an ordinary user, from a test (or benchmark) that runs as root.

What an administrator gives a rootless Corral, made for one run and undone after:
a home it owns (runtime and data dirs), a cgroup parent delegated to it, and a usable
/dev/net/tun. This machine's /dev/net/tun is 0600 (a container); stock Debian has it
0666: `argv` gives the process such a node in a mount namespace of its own (a tmpfs over
/dev/net), so the host's device is never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from corral.isolation.cgroups import CgroupDriver

NOBODY = 65534
TOOLS = ("slirp4netns", "unshare", "nsenter", "setpriv", "mknod")
_TUN = (
    "mount -t tmpfs -o mode=0755,size=64k corral-test-tun /dev/net"
    ' && mknod -m 0666 /dev/net/tun c 10 200 && exec "$@"'
)


def missing() -> list[str]:
    """The tools this needs that the host lacks."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@contextlib.contextmanager
def home(uid: int = NOBODY) -> Iterator[Path]:
    """A directory with `run` and `data` in it, owned by `uid`; removed after."""
    base = Path(tempfile.mkdtemp(prefix="corral-rootless-", dir="/tmp"))
    try:
        base.chmod(0o755)
        for name in ("run", "data"):
            (base / name).mkdir()
            os.chown(base / name, uid, uid)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def delegated_cgroup(under: str, uid: int = NOBODY) -> Iterator[str]:
    """A cgroup parent below `under` delegated to `uid` (its directories and files
    theirs); its name. Removed after (its sandboxes' cgroups must be gone by then)."""
    parent = f"{under}/rootless-{secrets.token_hex(4)}"
    made = [Path(root, parent) for root in set(CgroupDriver.detect(parent).mount_points().values())]
    try:
        for path in made:
            path.mkdir(parents=True)
            use_hierarchy = path / "memory.use_hierarchy"
            if use_hierarchy.exists():
                use_hierarchy.write_text("1")
            for entry in [path, *path.iterdir()]:
                os.chown(entry, uid, uid)
        yield parent
    finally:  # the sandboxes' own first: one a failed test did not destroy
        for path in made:
            for child in sorted(path.glob("**/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    child.rmdir()


def argv(gateway_netns: str, command: Sequence[str], uid: int = NOBODY) -> list[str]:
    """`command` run as `uid` (no groups) in the network namespace /run/netns/NAME
    `gateway_netns`, with a usable /dev/net/tun."""
    return [
        "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _TUN, "sh",
        "nsenter", f"--net=/run/netns/{gateway_netns}", "--",
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
        *command,
    ]  # fmt: skip
