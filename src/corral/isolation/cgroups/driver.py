"""`CgroupDriver`: creates and finds sandbox cgroups below Corral's parent on one host."""

from __future__ import annotations

import errno
import logging
import os
from abc import ABC, abstractmethod
from contextlib import suppress
from typing import ClassVar, Literal

from corral.errors import CorralError, InvalidRequest, IsolationUnavailable
from corral.isolation.cgroups.cgroup import Cgroup, CgroupFS, _os_error
from corral.isolation.cgroups.values import V1_CONTROLLERS, V2_CONTROLLERS, CgroupLimits

logger = logging.getLogger(__name__)

MOUNTS_FILE = "/proc/self/mounts"


def _check_name(name: str, what: str = "cgroup name") -> str:
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\0" in name
        or name.startswith("cgroup.")
        or len(name) > 200
    ):
        raise InvalidRequest(
            f"{what} {name!r} is invalid: use up to 200 characters without '/' or NUL, "
            "not '.' or '..' and not starting with 'cgroup.'"
        )
    return name


def _check_parent(parent: str) -> str:
    for part in parent.split("/"):
        _check_name(part, "cgroup parent component")
    return parent


class CgroupDriver(ABC):
    """Creates and finds sandbox cgroups below Corral's parent cgroup on one host."""

    version: ClassVar[Literal[1, 2]]

    def __init__(self, parent: str, fs: CgroupFS | None) -> None:
        self.parent = _check_parent(parent)
        self._fs = fs or CgroupFS()

    @classmethod
    def detect(
        cls,
        parent: str = "corral",
        *,
        mounts_file: str = MOUNTS_FILE,
        root: str = "/",
        fs: CgroupFS | None = None,
    ) -> CgroupDriver:
        """The driver for this host, from the cgroup mounts listed in `mounts_file`.

        Mount points are looked up below `root`, so a tmp dir laid out like / stands in
        for the host in tests. Called on `CgroupV1Driver` or `CgroupV2Driver`, only that
        version is considered. Raises IsolationUnavailable naming what is missing.
        """
        # `detect` knows both versions' drivers, which subclass this one: import it late.
        from corral.isolation.cgroups.detect import detect_driver

        return detect_driver(cls, parent, mounts_file, root, fs or CgroupFS())

    @abstractmethod
    def missing(self) -> list[str]:
        """The controllers sandboxes need (memory, cpu, pids, freezer …) that are absent."""

    @abstractmethod
    def mount_points(self) -> dict[str, str]:
        """Controller (or "unified" for v2) -> where its hierarchy is mounted."""

    @abstractmethod
    def hint(self, controller: str) -> str:
        """How to make `controller` available."""

    @abstractmethod
    def notes(self) -> list[str]:
        """Caveats of this host for a doctor report."""

    @abstractmethod
    def _cgroup(self, name: str) -> Cgroup: ...

    @abstractmethod
    def _roots(self) -> list[str]:
        """The mount point of each distinct hierarchy used."""

    def _parent_dirs(self) -> list[str]:
        return [os.path.join(root, self.parent) for root in self._roots()]

    @abstractmethod
    def _ensure_parent(self) -> None: ...

    def explain(self, missing: list[str]) -> str:
        hints = "; ".join(self.hint(c) for c in missing)
        return f"cgroup v{self.version} lacks {', '.join(missing)}: {hints}"

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        """Create the cgroup for sandbox `name` with `limits`; it must not exist yet."""
        cgroup = self._cgroup(_check_name(name))
        if missing := self.missing():
            raise IsolationUnavailable(self.explain(missing))
        self._ensure_parent()
        if cgroup.exists():
            raise InvalidRequest(f"cgroup {name!r} already exists; destroy it first")
        created = False
        try:
            for directory in cgroup.directories():
                self._mkdir(directory)
                created = True
            cgroup.set_limits(limits)
        except BaseException:
            if created:  # never tear down a cgroup another caller raced us to create
                with suppress(CorralError):
                    cgroup.destroy()
            raise
        logger.debug("created cgroup", extra={"cgroup": name, "limits": limits})
        return cgroup

    def open(self, name: str) -> Cgroup | None:
        """The existing cgroup of sandbox `name`, or None."""
        cgroup = self._cgroup(_check_name(name))
        return cgroup if cgroup.exists() else None

    def remove_parent(self) -> None:
        """Remove Corral's empty parent cgroup (tests, uninstall); no-op when absent."""
        if names := self.list():
            raise InvalidRequest(f"sandbox cgroups remain under {self.parent!r}: {names[:10]}")
        parts = self.parent.split("/")
        for root in self._roots():
            for depth in range(len(parts), 0, -1):
                path = os.path.join(root, *parts[:depth])
                try:
                    self._fs.rmdir(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        break  # an ancestor that holds other cgroups too
                    raise _os_error(exc, f"remove {path}") from exc

    def describe(self) -> dict[str, object]:
        """Version, mount points and controllers for a doctor report."""
        missing = self.missing()
        return {
            "version": self.version,
            "parent": self.parent,
            "mounts": self.mount_points(),
            "available": [c for c in self._wanted() if c not in missing],
            "missing": missing,
            "hints": [self.hint(c) for c in missing],
            "notes": self.notes(),
        }

    def _wanted(self) -> tuple[str, ...]:
        return (*V2_CONTROLLERS, "freezer") if self.version == 2 else V1_CONTROLLERS

    def _mkdir(self, path: str, exist_ok: bool = False) -> None:
        try:
            self._fs.mkdir(path)
        except FileExistsError:
            if not exist_ok:
                raise InvalidRequest(f"cgroup {path} already exists; destroy it first") from None
        except OSError as exc:
            raise _os_error(exc, f"create {path}") from exc

    # Defined last: inside the class body the name `list` is this method from here on.
    def list(self) -> list[str]:
        """Names of the sandbox cgroups under Corral's parent (the reaper walks these)."""
        names: set[str] = set()
        for directory in self._parent_dirs():
            with suppress(FileNotFoundError):
                names.update(self._fs.subdirs(directory))
        return sorted(names)
