"""Templates: the read-only root filesystems sandboxes start from.

This issue ships one, `host`: the host's /usr (read-only, no build, instant) and the few
files under /etc that programs need to run — never the host's secrets (/etc/shadow,
ssh keys), /root, /home or /var.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from corral.errors import UnknownTemplate

# /etc entries a shell, the dynamic linker, Python and TLS clients need. Everything else
# under the host's /etc stays invisible; passwd/group/hosts are written per sandbox.
_HOST_ETC = (
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "nsswitch.conf",
    "protocols",
    "services",
    "mime.types",
    "ssl/certs",
    "ca-certificates",
    "bash.bashrc",
    "profile",
    "inputrc",
    "magic",
    "os-release",
    "python3",
    "python3.11",
    "python3.12",
    "python3.13",
)


@dataclass(frozen=True)
class Template:
    """A root filesystem: read-only binds plus symlinks, as (host path, sandbox path),
    and the host's /etc entries (relative paths) its /etc holds."""

    name: str
    ro_binds: tuple[tuple[str, str], ...]
    symlinks: tuple[tuple[str, str], ...]
    etc: tuple[str, ...] = ()


@functools.cache  # probed once per process: it is on every sandbox's creation path
def _host_template() -> Template:
    binds: list[tuple[str, str]] = [("/usr", "/usr")]
    links: list[tuple[str, str]] = []
    # Merged-/usr hosts (Debian 12+) have /bin -> usr/bin; older ones have real dirs.
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / top
        if host.is_symlink():
            links.append((os.readlink(host), f"/{top}"))
        elif host.is_dir():
            binds.append((str(host), f"/{top}"))
    etc = tuple(entry for entry in _HOST_ETC if os.path.lexists(f"/etc/{entry}"))
    return Template("host", tuple(binds), tuple(links), etc)


TEMPLATE_NAMES = ("host",)


def get_template(name: str) -> Template:
    if name == "host":
        return _host_template()
    raise UnknownTemplate(
        f"unknown template {name!r}; available templates: {', '.join(TEMPLATE_NAMES)}"
    )
