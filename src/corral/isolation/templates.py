"""Templates: the read-only root filesystems sandboxes start from.

Two kinds:
- `host`, built in: the host's /usr (read-only, no build, instant) and the few files under
  /etc that programs need to run — never the host's secrets (/etc/shadow, ssh keys),
  /root, /home or /var.
- layer templates (`LayerTemplate`), registered in an engine's `Templates`: `/` is an
  overlay of stored layers (`corral.images`), each sandbox writing to a disk of its own
  (`corral.isolation.rootfs`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from corral.errors import InvalidRequest, UnknownTemplate
from corral.images import LayerStore

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
# The unprivileged user every sandbox has (uid 1000 in its user namespace): the default
# one commands run as. As root, a sandbox also has `root` (see `namespace`, `idrange`).
SANDBOX_USER = "user"
SANDBOX_UID = 1000
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A user as a template names it: a name as useradd takes one, or a uid of the sandbox.
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}|[0-9]{1,5}")


def get_template(name: str) -> Template:
    if name == "host":
        return _host_template()
    raise UnknownTemplate(
        f"unknown template {name!r}; available templates: {', '.join(TEMPLATE_NAMES)}"
    )


@dataclass(frozen=True)
class LayerTemplate:
    """A root filesystem made of stored layers (bottom first) and what sandboxes of it
    start with: environment, working directory (None: /workspace) and the user commands
    run as by default (`root`, `user`, or a name or uid of its own /etc/passwd, looked up
    when a sandbox starts)."""

    name: str
    layers: tuple[Path, ...]
    digests: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    user: str = SANDBOX_USER
    # Started in the background when a sandbox of it starts (shell text, `sh -c`), and
    # what must then exit 0 before the sandbox is handed out (`corral.sandboxes.startup`).
    start: str | None = None
    ready: str | None = None
    # The store holding the layers: each sandbox of the template holds them there too.
    store: LayerStore | None = field(default=None, compare=False, repr=False)


class Templates:
    """The templates an engine can start sandboxes from: `host` and the layer templates
    added to it (the services fill it from the SQL store). A template holds a reference
    on each of its layers in the store, so the store refuses to remove them."""

    def __init__(self) -> None:
        self._layered: dict[str, tuple[LayerStore, LayerTemplate]] = {}

    def names(self) -> list[str]:
        return [*TEMPLATE_NAMES, *sorted(self._layered)]

    def add(
        self,
        name: str,
        store: LayerStore,
        digests: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str = SANDBOX_USER,
        start: str | None = None,
        ready: str | None = None,
    ) -> LayerTemplate:
        """Register (or replace) the layer template `name`; its layers must be in `store`."""
        if _NAME.fullmatch(name) is None or name in TEMPLATE_NAMES:
            raise InvalidRequest(
                f"template name {name!r} is invalid or reserved: use 1-64 lower-case "
                "letters, digits, '.', '_', '-' (not 'host')"
            )
        if not digests:
            raise InvalidRequest(f"template {name!r} needs at least one layer")
        if _USER.fullmatch(user) is None or (user.isdigit() and int(user) > 65535):
            raise InvalidRequest(
                f"template {name!r} asks for user {user!r}: use root, user, a user name of "
                "the template's /etc/passwd, or a uid from 0 to 65535"
            )
        if workdir is not None and (not workdir.startswith("/") or "\0" in workdir):
            raise InvalidRequest(f"workdir {workdir!r} must be an absolute path")
        for key, value in (env or {}).items():
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidRequest(f"environment variable {key!r} is invalid")
        layers = tuple(store.get(digest).path for digest in digests)  # UnknownLayer if not
        for what, command in (("start", start), ("ready", ready)):
            if command is not None and (not command.strip() or "\0" in command):
                raise InvalidRequest(f"template {name!r}: its {what} command is empty or invalid")
        template = LayerTemplate(
            name, layers, tuple(digests), dict(env or {}), workdir, user, start, ready, store
        )
        holder = f"template.{name}"
        for digest in digests:
            store.reference(digest, holder)
        if (old := self._layered.get(name)) is not None:
            for digest in set(old[1].digests) - set(digests):
                old[0].release(digest, holder)
        self._layered[name] = (store, template)
        return template

    def remove(self, name: str) -> None:
        """Forget the layer template `name` and release its layers (sandboxes started
        from it keep running: their root is mounted)."""
        store, template = self._entry(name)
        for digest in template.digests:
            store.release(digest, f"template.{name}")
        del self._layered[name]

    def get(self, name: str) -> Template | LayerTemplate:
        if name in TEMPLATE_NAMES:
            return get_template(name)
        return self._entry(name)[1]

    def _entry(self, name: str) -> tuple[LayerStore, LayerTemplate]:
        try:
            return self._layered[name]
        except KeyError:
            raise UnknownTemplate(
                f"unknown template {name!r}; available templates: {', '.join(self.names())}"
            ) from None
