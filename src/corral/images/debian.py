"""Debian and Ubuntu bases: a root filesystem bootstrapped by mmdebstrap, stored as a layer.

This is the base that works on a host that reaches only a Debian mirror (no registry):
`bootstrap(suite, target, mirror=..., include=...)`. A local mirror (`copy://` or `file://`,
such as the archive `make setup` makes for the tests) is used inside a network namespace
with nothing but loopback, so an offline bootstrap can never fall back to the network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from corral.errors import ImagePullFailed, InvalidRequest
from corral.images._store import Layer, LayerStore

__all__ = ["DEFAULT_MIRROR", "VARIANTS", "bootstrap", "bootstrap_layer", "host_suite"]

DEFAULT_MIRROR = "http://deb.debian.org/debian"
# mmdebstrap's variants that give a usable system (`extract`/`custom` give no dpkg state).
VARIANTS = ("essential", "apt", "minbase", "buildd", "required", "important", "standard")
_SUITE = re.compile(r"[a-z][a-z0-9.-]{0,31}")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]{0,127}(=[A-Za-z0-9.+~:-]{1,64})?")
_LOCAL_MIRROR = ("copy://", "file://")


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's Debian or Ubuntu suite (VERSION_CODENAME): the suite of bases built
    for the host's own use (`corral vm`'s language templates), so that its mirror serves
    them. InvalidRequest on a host that names none."""
    try:
        lines = os_release.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and _SUITE.fullmatch(value.strip().strip('"')):
            return value.strip().strip('"')
    raise InvalidRequest(
        f"{os_release} names no Debian or Ubuntu suite (VERSION_CODENAME): language "
        "bases are built for the host's suite"
    )


def _check(suite: str, variant: str, include: Sequence[str], mirror: str) -> None:
    if _SUITE.fullmatch(suite) is None:
        raise InvalidRequest(f"suite {suite!r} is not a Debian or Ubuntu suite name (bookworm)")
    if variant not in VARIANTS:
        raise InvalidRequest(f"variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}")
    for package in include:
        if _PACKAGE.fullmatch(package) is None:
            raise InvalidRequest(
                f"package {package!r} is not a Debian package name (name or name=version)"
            )
    if not mirror or any(char in mirror for char in "\0\n"):
        raise InvalidRequest(f"mirror {mirror!r} is not a sources.list entry or URL")


def bootstrap(
    suite: str,
    target: Path,
    *,
    mirror: str = DEFAULT_MIRROR,
    variant: str = "apt",
    include: Sequence[str] = (),
    timeout: float = 1800,
) -> None:
    """Bootstrap `suite` into the empty or missing directory `target` with mmdebstrap's
    root mode (the caller is root). `mirror` is a URL or a whole sources.list line
    (`deb [trusted=yes] copy:///srv/archive ./`). Raises ImagePullFailed with mmdebstrap's
    last lines when it fails."""
    _check(suite, variant, include, mirror)
    if shutil.which("mmdebstrap") is None:
        raise ImagePullFailed("a Debian base needs mmdebstrap: apt-get install mmdebstrap")
    command = ["mmdebstrap", "--quiet", "--mode=root", f"--variant={variant}"]
    if include:
        command.append("--include=" + ",".join(include))
    command += [suite, str(target), mirror]
    if any(marker in mirror for marker in _LOCAL_MIRROR):
        command = ["unshare", "--net", *command]
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise ImagePullFailed(f"mmdebstrap of {suite} did not finish in {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ImagePullFailed(f"mmdebstrap of {suite} from {mirror} failed:\n{tail}")


def bootstrap_layer(
    store: LayerStore,
    suite: str,
    *,
    mirror: str = DEFAULT_MIRROR,
    variant: str = "apt",
    include: Sequence[str] = (),
    max_bytes: int | None = None,
) -> Layer:
    """`bootstrap` into the store's staging area and import the result as one layer."""
    with store.staging() as staging:
        rootfs = staging / "rootfs"
        bootstrap(suite, rootfs, mirror=mirror, variant=variant, include=include)
        return store.import_dir(rootfs, max_bytes=max_bytes)
