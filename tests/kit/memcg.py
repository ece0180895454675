"""A sandbox's memory cgroup as the host sees it (v1 or v2), for tests that check what
the kernel holds a sandbox to and charges it with."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cgroup_dirs


def _memory_file(sandbox_id: str, *names: str) -> Path:
    for directory in cgroup_dirs(sandbox_id):
        for name in names:
            if (directory / name).exists():
                return directory / name
    raise AssertionError(f"no memory cgroup of {sandbox_id}")


def memory_limit(sandbox_id: str) -> int:
    """The memory limit the kernel holds the sandbox to."""
    return int(_memory_file(sandbox_id, "memory.max", "memory.limit_in_bytes").read_text())


def shmem(sandbox_id: str) -> int:
    """The tmpfs (shared memory) bytes charged to the sandbox's memory cgroup: pages no
    reclaim can free (unlike a disk's page cache)."""
    text = _memory_file(sandbox_id, "memory.stat").read_text()
    return int(dict(line.split() for line in text.splitlines())["shmem"])
