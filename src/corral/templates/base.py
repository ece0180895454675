"""The server's `base` template: E2B's default template, the same for every team.

E2B code creates sandboxes of `base` without building anything, so every team sees this
one (a team's own template named `base` wins for that team). It is a Debian base of the
server's suite (`host_suite`, from `Settings.debian_mirror`) with what E2B's base image
offers that code relies on: bash, coreutils, python3, git (with `git daemon`), curl,
tput, procps, useradd; a user `user` (uid 1000, group `user`, member of `sudo`, home
/home/user, shell bash) that commands run as, in /home/user; umask 022 for login
shells. `/usr/bin/sudo` is Corral's: a setuid sudo cannot work in a sandbox (bubblewrap
sets no_new_privs), so it asks the guest agent to run the command as root
(`corral.guest.agent_sudo`); Debian's sudo, if someone installs it, is diverted to
/usr/bin/sudo.distrib.

It is not a row of the SQL store (rows belong to teams) but a record beside the layer
store, `<data_dir>/templates/server/base.json`: its layers, made once per `RECIPE`. It is
built on first use (`CORRAL_BASE_TEMPLATE=first-use`, the default: the first create of
`base` starts the build and is told to try again in a minute or two) or when the server
starts (`start`), never with `off`. Tests install it from a cached tar
(tests/kit/e2b_base.py) before their server starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from corral.errors import ImagePullFailed, TemplateNotFound, TemplateNotReady, UnknownLayer
from corral.images import LayerStore
from corral.images.debian import bootstrap, host_suite

if TYPE_CHECKING:
    from corral.templates.catalog import TemplateCatalog

log = logging.getLogger("corral.templates")

NAME = "base"
USER = "user"
HOME = "/home/user"
# Debian packages beyond the essential set (which has bash, coreutils and ncurses-bin's
# tput). passwd: useradd, for the recipe and for code that adds users.
PACKAGES = ("python3", "git", "curl", "ca-certificates", "procps", "passwd")
# Bumped when what `customize` does changes: a record of another recipe is built again.
RECIPE = 2
MODES = ("first-use", "start", "off")
ID_PREFIX = "base-"  # its name in the engine (a team's rows are `t…`)

# /usr/bin/sudo: the client lives with the guest agent (/.corral), so it always speaks
# the agent's own protocol, whatever Corral version built the template.
SUDO = """#!/bin/sh
# Corral's sudo: the sandbox's guest agent runs the command as root (or -u USER).
exec /usr/bin/python3 -I -S /.corral/sudo.py "$@"
"""
UMASK = "# Corral's base template: new files 0644, directories 0755 (as E2B's).\numask 022\n"
# Debian's /etc/profile forks `id -u` to choose root's PATH, and every E2B command runs in
# a login shell (`bash -l -c`): ~1.5 ms a command. bash knows its uid ($EUID); other
# shells still ask `id`.
PROFILE_UID = ('"$(id -u)"', '"${EUID:-$(id -u)}"')


@dataclass(frozen=True)
class BaseRecord:
    """The server's base as recorded: its layers (bottom first) and for what."""

    layers: tuple[str, ...]
    suite: str
    recipe: int
    built_at: float

    @property
    def template_id(self) -> str:
        """Its name in the engine: one per content, never a team row's `t…` id."""
        return ID_PREFIX + self.layers[-1].removeprefix("sha256:")[:16]


def customize(rootfs: Path) -> None:
    """Turn a bootstrapped Debian tree (`PACKAGES` included) into the base: the user,
    sudo and umask. Runs as the host's root on a tree just bootstrapped from the mirror
    (mmdebstrap already ran its maintainer scripts in it with chroot)."""
    for argv in (
        ["useradd", "--create-home", "--uid", "1000", "--user-group", "--groups", "sudo",
         "--shell", "/bin/bash", USER],
        ["dpkg-divert", "--quiet", "--local", "--rename",
         "--divert", "/usr/bin/sudo.distrib", "--add", "/usr/bin/sudo"],
    ):  # fmt: skip
        done = subprocess.run(
            ["chroot", str(rootfs), *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            raise ImagePullFailed(
                f"the base template's {argv[0]} failed: {done.stderr.strip()[-300:]}"
            )
    _write(rootfs / "usr/bin/sudo", SUDO, 0o755)
    _write(rootfs / "etc/profile.d/corral-umask.sh", UMASK, 0o644)
    profile = rootfs / "etc/profile"
    if profile.is_file() and not profile.is_symlink():
        _write(profile, profile.read_text().replace(*PROFILE_UID), 0o644)


def _write(path: Path, text: str, mode: int) -> None:
    # The tree is Debian's own: its /usr/bin and /etc/profile.d are real directories.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with open(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def make_rootfs(suite: str, target: Path, mirror: str) -> None:
    """Bootstrap and customize the base into the missing directory `target`."""
    bootstrap(suite, target, mirror=mirror, variant="apt", include=PACKAGES)
    customize(target)


def record_path(store: LayerStore) -> Path:
    return store.root / "server" / f"{NAME}.json"


def read_record(store: LayerStore) -> BaseRecord | None:
    """The recorded base of this `RECIPE` whose layers are all stored, else None."""
    try:
        doc = json.loads(record_path(store).read_text())
        record = BaseRecord(tuple(doc["layers"]), doc["suite"], doc["recipe"], doc["built_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.recipe != RECIPE or not record.layers:
        return None
    try:
        for digest in record.layers:
            store.get(digest)
    except UnknownLayer:
        return None
    return record


def write_record(store: LayerStore, layers: Sequence[str], suite: str) -> BaseRecord:
    """Record `layers` (stored already) as the server's base."""
    record = BaseRecord(tuple(layers), suite, RECIPE, time.time())
    path = record_path(store)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({**record.__dict__, "layers": list(record.layers)}))
    partial.rename(path)
    return record


@contextlib.contextmanager
def _build_lock(store: LayerStore) -> Iterator[None]:
    path = store.root / "server" / f"{NAME}.lock"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one build across the server and its workers
        yield
    finally:
        os.close(fd)


def build(store: LayerStore, mirror: str, suite: str | None = None) -> BaseRecord:
    """The recorded base, built now from `mirror` unless another process did (blocks for
    the bootstrap: 1-3 minutes from a network mirror). ImagePullFailed says why not."""
    with _build_lock(store):
        record = read_record(store)
        if record is not None:
            return record
        if os.geteuid() != 0:
            raise ImagePullFailed(
                "the base template is built with mmdebstrap as root: run the server as root"
            )
        suite = suite or host_suite()
        started = time.monotonic()
        log.info("building the base template", extra={"suite": suite, "mirror": mirror})
        with store.staging() as staging:
            rootfs = staging / "rootfs"
            make_rootfs(suite, rootfs, mirror)
            layer = store.import_dir(rootfs)
        record = write_record(store, [layer.digest], suite)
        log.info(
            "base template built",
            extra={"seconds": round(time.monotonic() - started, 1), "layer": layer.digest},
        )
        return record


class ServerBase:
    """One process's view of the server's base: the record, and the build on first use
    (in a thread: `resolve` is called on the event loop and never waits for it)."""

    def __init__(self, store: LayerStore, mirror: str, mode: str = "first-use") -> None:
        if mode not in MODES:
            raise ValueError(f"base template mode {mode!r}: use one of {', '.join(MODES)}")
        self.store = store
        self.mirror = mirror
        self.mode = mode
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._started_at: datetime | None = None
        self._error: str | None = None
        self._record: BaseRecord | None = None

    def record(self) -> BaseRecord | None:
        """The recorded base (read once found: it is on every create of `base`)."""
        if self._record is None:
            self._record = read_record(self.store)
        return self._record

    def is_base(self, engine_template: str) -> bool:
        """Whether `engine_template` (an engine's template name) is this base."""
        record = self.record()
        return record is not None and record.template_id == engine_template

    def start_build(self) -> None:
        """Start building it in the background unless built, building, or `off`."""
        with self._lock:
            if self.mode == "off" or (self._thread is not None and self._thread.is_alive()):
                return
            self._started_at, self._error = datetime.now(UTC), None
            self._thread = threading.Thread(target=self._build, name="corral-base", daemon=True)
            self._thread.start()

    def _build(self) -> None:
        try:
            build(self.store, self.mirror)
        except Exception as exc:  # reported to the next caller, which may try again
            log.error("the base template could not be built", extra={"error": str(exc)})
            self._error = str(exc)

    def ensure(self, mirror: str | None = None) -> BaseRecord:
        """The record, built now (blocking) if there is none."""
        if self.record() is None:
            self._record = build(self.store, mirror or self.mirror)
        assert self._record is not None
        return self._record

    def wait(self, timeout: float | None = None) -> BaseRecord | None:
        """The record once a build started here ends (None if it failed)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.record()

    def missing(self) -> TemplateNotFound | TemplateNotReady:
        """Why `base` cannot serve now; starts its build when it is first asked for."""
        if self.mode == "off":
            return TemplateNotFound(
                "your team has no template 'base', and this server builds none for every "
                "team (CORRAL_BASE_TEMPLATE=off): build one, or use 'host'"
            )
        if os.geteuid() != 0:  # no build could succeed: say so rather than retry
            return TemplateNotFound(
                "your team has no template 'base', and this server cannot make one for "
                "every team: layer templates need Corral to run as root; use 'host'"
            )
        failed = self._error
        self.start_build()
        if failed is not None:
            return TemplateNotReady(
                f"the server's base template could not be built ({failed}); building it "
                "again now: try again in a few minutes"
            )
        since = (datetime.now(UTC) - (self._started_at or datetime.now(UTC))).total_seconds()
        return TemplateNotReady(
            f"the server is building its base template from {self.mirror} (for {since:.0f} "
            "s; it takes 1-3 minutes): try again shortly"
        )


def ensure_base(catalog: TemplateCatalog, mirror: str | None = None) -> BaseRecord:
    """Make sure the server of `catalog` has its base, building it now (blocking, from
    `mirror` or the server's `debian_mirror`) if it has none; its record."""
    return catalog.server_base.ensure(mirror)
