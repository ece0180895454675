"""A layer template's sandbox with `ram_disk=True`: what it writes anywhere in `/` lives on
a tmpfs charged to its memory cgroup (memory grows with a written file, and the RAM disk
stops at the memory limit less the headroom of `Limits.storage_bytes`, with an ENOSPC the
writer sees while the sandbox lives on). Without it, writes go to its ext4 disk and do
not count against its memory: a file larger than the memory limit is written."""

from __future__ import annotations

import pytest

from corral.isolation import Engine, Limits, Sandbox
from tests.kit.debian import needs_archive
from tests.kit.memcg import shmem

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]

MIB = 1024 * 1024


async def write(box: Sandbox, path: str, mib: int) -> tuple[int, str]:
    ran = await box.run(
        ["sh", "-c", f"dd if=/dev/zero of={path} bs=1M count={mib} conv=fsync 2>&1"],
        user="root",
    )
    return ran.exit_code, ran.stdout.decode()


async def test_a_ram_disk_holds_what_the_sandbox_writes_in_its_memory(
    engine_debian: Engine,
) -> None:
    limits = Limits(memory_mib=256, disk_mib=1024)
    box = await engine_debian.create(
        template="debian", isolation="namespace", limits=limits, ram_disk=True
    )
    try:
        memory, held = box.usage().memory_bytes, shmem(box.id)
        code, out = await write(box, "/workspace/big", 100)
        assert code == 0, out
        # The 100 MiB are the sandbox's memory, and stay so (no reclaim frees a tmpfs).
        assert box.usage().memory_bytes - memory >= 95 * MIB
        assert shmem(box.id) - held >= 95 * MIB
        # Anywhere in `/` (the overlay's upper dir is on the RAM disk), not just /workspace.
        code, out = await write(box, "/var/more", 20)
        assert code == 0, out
        assert shmem(box.id) - held >= 115 * MIB
        # Bounded like a `host` sandbox's storage: the memory limit less 64 MiB of headroom
        # (192 MiB here, not the 1024 MiB disk limit); full, the writer gets ENOSPC and the
        # sandbox goes on.
        code, out = await write(box, "/workspace/too-much", 150)
        assert code != 0 and "No space left" in out, out
        script = "rm /workspace/big /workspace/too-much /var/more; echo alive"
        ran = await box.run(["sh", "-c", script], user="root")
        assert ran.stdout == b"alive\n"
        assert shmem(box.id) - held < 16 * MIB  # freed with the files
    finally:
        await box.destroy()


async def test_without_a_ram_disk_writes_do_not_count_against_memory(
    engine_debian: Engine,
) -> None:
    limits = Limits(memory_mib=128, disk_mib=512)
    box = await engine_debian.create(template="debian", isolation="namespace", limits=limits)
    try:
        held = shmem(box.id)
        # Twice the memory limit, written and synced: its disk holds it, not its memory.
        code, out = await write(box, "/workspace/big", 256)
        assert code == 0, out
        assert shmem(box.id) - held < 16 * MIB
        assert box.usage().memory_bytes <= limits.memory_bytes
        ran = await box.run(["sh", "-c", "stat -c %s /workspace/big"])
        assert ran.stdout == f"{256 * MIB}\n".encode()
    finally:
        await box.destroy()
