"""`corral install` and `corral uninstall`: systemd units for the server and its workers.

`install` writes `corral-server.service`, the template `corral-worker@.service` (one
instance per worker process: `systemctl enable --now corral-worker@1 corral-worker@2`),
the env file both read (/etc/corral/corral.env, mode 0600: it may hold the database's
password), and the list of what it wrote, next to the env file. `uninstall` stops and
disables the units (when systemd runs) and removes exactly the files on that list: never
the data directory (the store), and never an env file that was there before.

A system install (the default) needs root; `--user` writes units of the calling user's
own systemd instead; `--root DIR` writes under DIR as if it were / (packaging, tests) and
leaves the running systemd alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from corral.cli._common import command, out, warn
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.cli._common import Commands

SERVER_UNIT = "corral-server.service"
WORKER_UNIT = "corral-worker@.service"
ENV_FILE = "corral.env"
# What `install` wrote, one path a line; `uninstall` removes those (of the files above).
MANIFEST = "installed"


class Layout:
    """Where a system or user install puts its files, under `root` (/ unless --root).
    (A plain class: `corral --help` loads this module, and no more than it needs.)"""

    def __init__(self, user: bool, root: Path) -> None:
        self.user = user
        self.root = root

    @property
    def units_dir(self) -> Path:
        if self.user:
            return self._config_home() / "systemd" / "user"
        return Path("/etc/systemd/system")

    @property
    def config_dir(self) -> Path:
        return self._config_home() / "corral" if self.user else Path("/etc/corral")

    @property
    def env_file(self) -> Path:
        return self.config_dir / ENV_FILE

    @property
    def manifest(self) -> Path:
        return self.config_dir / MANIFEST

    def files(self) -> tuple[Path, ...]:
        """Every file an install may write but the manifest: all `uninstall` may remove."""
        return (self.units_dir / SERVER_UNIT, self.units_dir / WORKER_UNIT, self.env_file)

    def on_disk(self, path: Path) -> Path:
        """Where `path` (as the installed system sees it) is written."""
        return self.root / path.relative_to("/")

    def runs_systemd(self) -> bool:
        """Whether to tell the running systemd: the real root, booted with systemd."""
        return self.root == Path("/") and Path("/run/systemd/system").is_dir()

    def systemctl(self, *args: str) -> None:
        import subprocess

        argv = ["systemctl", *(["--user"] if self.user else []), *args]
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            warn("warning:", f"`{' '.join(argv)}` failed: {done.stderr.strip()[-300:]}")

    def _config_home(self) -> Path:
        return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def _layout(args: argparse.Namespace) -> Layout:
    root = Path(args.root).absolute()
    if not root.is_dir():
        raise InvalidRequest(f"--root {args.root}: no such directory: create it, or leave it out")
    layout = Layout(user=args.user, root=root)
    if not layout.user and layout.root == Path("/") and os.geteuid() != 0:
        raise InvalidRequest(
            f"a system install writes {layout.units_dir} and {layout.config_dir}: run it as "
            "root (sudo), or pass --user for units of your own user's systemd"
        )
    return layout


# -- the units ----------------------------------------------------------------------------

_HEADER = """\
# Written by `corral install`; `corral uninstall` removes it. Settings go in
# {env_file}, not here; then
# `systemctl{user} reload {unit}` applies the log level at once, the rest needs a restart.
"""

_SERVICE = """\
[Service]
# Started once exec'd: Corral speaks no readiness protocol (the server answers /healthz).
Type=exec
ExecStart={exe} {command} --env-file {env_file}
# SIGHUP: the process reads the env file again and applies what can change live.
ExecReload=/bin/kill -HUP $MAINPID
# Logs are JSON lines on stderr; the journal keeps them (journalctl{user} -u {unit}).
StandardOutput=journal
StandardError=journal
{directories}\
# Corral makes cgroups for its sandboxes, sets their limits and moves processes into
# them: Delegate=yes says this unit manages cgroups itself, so systemd enables the
# controllers for it (cgroup v2) and never moves or prunes what it made.
Delegate=yes
# SIGTERM to the main process alone: it stops taking work, lets calls finish
# (CORRAL_SHUTDOWN_GRACE) and kills its sandboxes itself; whatever still runs in the
# unit's cgroup after TimeoutStopSec (under cgroup v1, the sandboxes too) is SIGKILLed,
# and the next start reaps what that left.
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=2
# Every sandbox holds descriptors (its namespaces, pipes, cgroup files) and every API
# stream one more: the default soft limit (1024) would cap a busy server.
LimitNOFILE=65536
# Setuid programs cannot raise the privileges of anything this unit runs. Compatible:
# Corral execs no setuid helper (as root it writes sandboxes' uid maps itself, not
# through newuidmap; Debian's bubblewrap is not setuid and sets no_new_privs on every
# sandbox anyway; sudo in a sandbox is the guest agent's, not a setuid binary).
NoNewPrivileges=yes
{protection}\
# Not set, as each would break what Corral does: ProtectKernelTunables (it writes
# /proc/sys in sandboxes' namespaces), ProtectControlGroups (it makes cgroups),
# PrivateDevices (/dev/kvm, /dev/net/tun, /dev/fuse), PrivateNetwork (sandboxes'
# internet mode), RestrictNamespaces and SystemCallFilter (namespaces, mounts, seccomp),
# ProtectKernelModules (nftables may load its modules).
"""

_SYSTEM_DIRECTORIES = """\
# /var/lib/corral (the store, templates, the default key) and /run/corral (the sandboxes'
# state, which the reaper reads after a crash), made by systemd, mode 0700 (Corral's own
# defaults as root). Kept when the unit stops: the server and the workers share them.
StateDirectory=corral
StateDirectoryMode=0700
RuntimeDirectory=corral
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
"""

_USER_DIRECTORIES = """\
# $XDG_RUNTIME_DIR/corral (the sandboxes' state, which the reaper reads after a crash);
# the store stays where `corral` looks by default ($XDG_DATA_HOME/corral).
RuntimeDirectory=corral
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
"""

_SYSTEM_PROTECTION = """\
# /usr, /boot, /efi and /etc read-only. Not `strict`: template builds (mmdebstrap, apt,
# skopeo) and runsc write under /var in places that vary with their versions.
ProtectSystem=full
# Home directories read-only, not hidden: the corral executable may be in a clone's
# virtualenv under /home (`make install`).
ProtectHome=read-only
# A /tmp and /var/tmp of its own: Corral keeps nothing in the host's, and sees no other
# service's.
PrivateTmp=yes
"""

_USER_PROTECTION = """\
# No ProtectSystem, ProtectHome or PrivateTmp: in a user unit they need a user namespace
# of systemd's (PrivateUsers), in which Corral could not map its sandboxes' ids.
"""

_SERVER = """\
[Unit]
Description=Corral API server (sandboxes and jobs)
{after}
{service}
[Install]
WantedBy={target}
"""

_WORKER = """\
[Unit]
Description=Corral job worker %i
# After the server when both start: it brings the store's schema up to date.
After=corral-server.service
{after}
{service}
[Install]
WantedBy={target}
"""


def render(layout: Layout, exe: Path) -> dict[Path, str]:
    """The two unit files by path (as the installed system sees them)."""
    user = " --user" if layout.user else ""
    after = (
        "# In a user instance: no system targets to wait for.\n"
        if layout.user
        else "# The server listens on the network and sandboxes may use it.\n"
        "After=network-online.target\nWants=network-online.target\n"
    )
    units = {}
    for name, template, command_name in (
        (SERVER_UNIT, _SERVER, "server"),
        (WORKER_UNIT, _WORKER, "worker"),
    ):
        short = name.removesuffix(".service")
        service = _SERVICE.format(
            exe=exe,
            command=command_name,
            env_file=layout.env_file,
            user=user,
            unit=f"'{short}*'" if short.endswith("@") else short,
            directories=_USER_DIRECTORIES if layout.user else _SYSTEM_DIRECTORIES,
            protection=_USER_PROTECTION if layout.user else _SYSTEM_PROTECTION,
        )
        header = _HEADER.format(env_file=layout.env_file, user=user, unit=short.replace("@", "@N"))
        body = template.format(
            after=after,
            service=service,
            target="default.target" if layout.user else "multi-user.target",
        )
        units[layout.units_dir / name] = header + body
    return units


def env_text(values: dict[str, str]) -> str:
    lines = [
        "# Corral's settings for corral-server and corral-worker@: CORRAL_<SETTING>=VALUE, one",
        "# a line (see the README). `systemctl reload corral-server` applies the log level at",
        "# once and logs the changes that need `systemctl restart corral-server`.",
    ]
    return "\n".join([*lines, *(f"{name}={value}" for name, value in values.items())]) + "\n"


def _settings(given: list[str]) -> dict[str, str]:
    """--set NAME=VALUE options as CORRAL_NAME=VALUE, each checked as the server would."""
    from dataclasses import fields

    from corral.config import ENV_PREFIX, Settings

    names = {f.name.upper() for f in fields(Settings)} - {"ENV_FILE"}
    values = {}
    for item in given:
        name, sep, value = item.partition("=")
        name = name.strip().upper().removeprefix(ENV_PREFIX).replace("-", "_")
        if not sep or name not in names:
            raise InvalidRequest(
                f"--set {item!r} is not NAME=VALUE with a setting's name (e.g. --set "
                "port=8080, --set CORRAL_LOG_LEVEL=debug; see the README's settings)"
            )
        values[ENV_PREFIX + name] = value.strip()
    Settings.from_env(values)  # a bad value is refused here, before anything is written
    return values


def _executable(path: str | None) -> Path:
    """The corral command the units run: --exec, else the one beside this interpreter."""
    if path is None:
        import shutil

        beside = Path(sys.executable).with_name("corral")
        found = beside if beside.exists() else shutil.which("corral")
        if found is None:
            raise InvalidRequest("no `corral` executable found: pass --exec PATH")
        path = str(found)
    exe = Path(path).absolute()
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise InvalidRequest(f"--exec {path}: not an executable file: pass the corral command")
    if any(c.isspace() or c in "%$\\\"'" for c in str(exe)):  # systemd would split or expand it
        raise InvalidRequest(
            f"--exec {path}: a path with spaces, quotes, % or $ cannot go in a unit: link the "
            "corral command from a plain path and pass that"
        )
    return exe


# -- the commands -------------------------------------------------------------------------


def install(args: argparse.Namespace) -> int:
    """Write systemd units for `corral server` and `corral worker`, and their env file."""
    layout = _layout(args)
    exe = _executable(args.exec)
    values = _settings(args.set)
    env_on_disk = layout.on_disk(layout.env_file)
    manifest = layout.on_disk(layout.manifest)
    files = render(layout, exe)
    if env_on_disk.exists() and not args.force:
        if values:
            raise InvalidRequest(
                f"{layout.env_file} exists: edit it, or pass --force to replace it with "
                "the --set settings"
            )
        env_mine = layout.env_file in _read_manifest(manifest)
    else:
        files[layout.env_file] = env_text(values)
        env_mine = True
    if not args.force:
        for path in files:
            if path != layout.env_file and layout.on_disk(path).exists():
                raise InvalidRequest(
                    f"{path} exists: `corral uninstall` first, or pass --force to rewrite it"
                )
    if args.dry_run:
        for path, text in files.items():
            out(f"# {path}")
            out(text)
        return 0
    for path, text in files.items():
        target = layout.on_disk(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, text, 0o600 if path == layout.env_file else 0o644)
    listed = [p for p in layout.files() if p in files or (p == layout.env_file and env_mine)]
    _write(manifest, "".join(f"{p}\n" for p in listed), 0o600)
    for path in files:
        out(f"wrote {layout.on_disk(path)}")
    if layout.env_file not in files:
        out(f"kept {env_on_disk} (--force replaces it)")
    user = " --user" if layout.user else ""
    if layout.runs_systemd():
        layout.systemctl("daemon-reload")
    out(f"start: systemctl{user} enable --now corral-server corral-worker@1")
    out(f"logs:  journalctl{user} -u corral-server -u 'corral-worker@*'")
    return 0


def uninstall(args: argparse.Namespace) -> int:
    """Stop and disable the units of `corral install` and remove what it wrote."""
    layout = _layout(args)
    manifest = layout.on_disk(layout.manifest)
    if not manifest.exists():
        raise InvalidRequest(
            f"nothing to uninstall: {layout.manifest} (written by `corral install`) is "
            "missing; pass --user or --root as you did to install"
        )
    listed = _read_manifest(manifest)
    # Only the files an install writes, whatever else the list says.
    doomed = [layout.on_disk(p) for p in layout.files() if p in listed]
    if args.dry_run:
        for target in [*doomed, manifest]:
            out(f"would remove {target}")
        return 0
    if layout.runs_systemd():
        layout.systemctl("stop", SERVER_UNIT, "corral-worker@*.service")
        layout.systemctl("disable", SERVER_UNIT, WORKER_UNIT)
    for target in [*doomed, manifest]:
        if target.exists():
            target.unlink()
            out(f"removed {target}")
    config_dir = layout.on_disk(layout.config_dir)
    if config_dir.is_dir() and not any(config_dir.iterdir()):
        config_dir.rmdir()
    if layout.runs_systemd():
        layout.systemctl("daemon-reload")
    out("the data directory (the store, templates, keys) is kept: remove it yourself")
    return 0


def _read_manifest(path: Path) -> set[Path]:
    try:
        return {Path(line) for line in path.read_text().splitlines() if line.strip()}
    except FileNotFoundError:
        return set()


def _write(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` with `mode` from the start (the env file is never readable
    by others, even for a moment), replacing the file whole."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(temporary, mode)  # whatever the umask took away
    temporary.replace(path)


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user", action="store_true", help="units of your own user's systemd, not the system's"
    )
    parser.add_argument("--root", default="/", help="write under this directory as if it were /")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done, do nothing")


def add_commands(commands: Commands) -> None:
    p = command(commands, "install", install)
    _where(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the env file (e.g. port=8080, log_level=debug); repeatable",
    )
    p.add_argument("--exec", help="the corral command the units run (default: this one)")
    p.add_argument(
        "--force", action="store_true", help="replace the units and env file if they exist"
    )
    p = command(commands, "uninstall", uninstall)
    _where(p)
