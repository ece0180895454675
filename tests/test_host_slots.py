"""Host-wide slots: as root, a sandbox's range of host uids and its uplink's addresses are
the host's, so two runtime dirs (two installs, two test processes) must not hand out the
same one. Real engines and real sandboxes on two runtime dirs, each with its own base."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import IDS_PER_SLOT, Settings
from corral.errors import SandboxStartFailed
from corral.isolation import Engine
from corral.isolation.footprint import Footprint, slot_holder, uid_slots_dir
from tests.conftest import require_backend

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="uid slots are root mode's")


@pytest.fixture
def uid_base(settings: Settings) -> Iterator[int]:
    """A base of its own (its registry too), so no other sandbox on the host takes these."""
    base = 1_000_000_000 + secrets.randbelow(2000) * 4 * IDS_PER_SLOT
    yield base
    shutil.rmtree(uid_slots_dir(settings.runtime_dir, base), ignore_errors=True)


@pytest.fixture
def runtime_dirs() -> Iterator[tuple[Path, Path]]:
    dirs = (Path(tempfile.mkdtemp(prefix="corral-a-")), Path(tempfile.mkdtemp(prefix="corral-b-")))
    yield dirs
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


def footprint(runtime_dir: Path) -> Footprint:
    return Footprint.create(runtime_dir, f"sb_{secrets.token_hex(10)}", "namespace")


async def test_two_runtime_dirs_never_share_a_range_of_host_uids(
    settings: Settings, uid_base: int, runtime_dirs: tuple[Path, Path]
) -> None:
    require_backend(settings, "namespace")
    engines = [
        Engine(
            dataclasses.replace(
                settings, runtime_dir=runtime, uid_base=uid_base, uid_slots=1, pool_size=0
            )
        )
        for runtime in runtime_dirs
    ]
    try:
        first = await engines[0].create(isolation="namespace")
        with pytest.raises(SandboxStartFailed, match="all 1 sandbox uids are in use"):
            await engines[1].create(isolation="namespace")
        assert list((runtime_dirs[1] / "sandboxes").iterdir()) == []  # the refused left nothing
        await first.destroy()
        second = await engines[1].create(isolation="namespace")
        assert second.footprint.uid_slot == 0
        assert (await second.run(["true"])).ok
        await second.destroy()
    finally:
        for engine in engines:
            await engine.aclose()


def test_a_slot_left_by_a_removed_runtime_dir_is_taken_over(
    uid_base: int, runtime_dirs: tuple[Path, Path]
) -> None:
    gone, live = runtime_dirs
    left = footprint(gone)
    assert left.claim_uid_slot(gone, uid_base, 1) == 0
    taker = footprint(live)
    with pytest.raises(SandboxStartFailed, match="in use"):
        taker.claim_uid_slot(live, uid_base, 1)  # its owner's directory is still there
    shutil.rmtree(gone)  # never released: its slot names a directory that is gone
    assert taker.claim_uid_slot(live, uid_base, 1) == 0
    entry = Path(taker.uid_slots_dir or "") / "0"
    assert slot_holder(entry) == str(taker.path.absolute())
    taker.release()
    assert slot_holder(entry) is None


def test_a_footprint_released_twice_frees_only_its_own_slot(
    uid_base: int, runtime_dirs: tuple[Path, Path]
) -> None:
    first, then = footprint(runtime_dirs[0]), footprint(runtime_dirs[1])
    first.claim_uid_slot(runtime_dirs[0], uid_base, 1)
    first.release()
    then.claim_uid_slot(runtime_dirs[1], uid_base, 1)
    first.release()  # idempotent: the slot is the other's now, and stays so
    entry = Path(then.uid_slots_dir or "") / "0"
    assert slot_holder(entry) == str(then.path.absolute())
    then.release()


def test_a_slot_in_the_old_form_is_held_and_freed_by_its_footprint(
    uid_base: int, runtime_dirs: tuple[Path, Path]
) -> None:
    """An older Corral took a slot as a directory; a footprint it recorded still frees it,
    and no claim takes it meanwhile."""
    old = footprint(runtime_dirs[0])
    registry = uid_slots_dir(runtime_dirs[0], uid_base)
    (registry / "0").mkdir(parents=True)
    old.uid_slot, old.uid_slots_dir = 0, str(registry)
    old.save()
    with pytest.raises(SandboxStartFailed, match="in use"):
        footprint(runtime_dirs[1]).claim_uid_slot(runtime_dirs[1], uid_base, 1)
    old.release()
    assert not (registry / "0").exists()
