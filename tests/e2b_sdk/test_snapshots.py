"""The official SDK's snapshots and forks against Corral: a snapshot boots independent
sandboxes with the files it had, is listed by source and by name, and is deleted once;
a fork copies the filesystem and lives on its own; a killed sandbox cannot be forked."""

from __future__ import annotations

import uuid

import pytest
from conftest import SANDBOX_TIMEOUT, TEMPLATE
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import SandboxNotFoundException


def test_a_snapshot_boots_independent_sandboxes_and_is_deleted_once(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/state.txt", "original")
    name = f"snap-{uuid.uuid4().hex[:12]}"
    snapshot = sandbox.create_snapshot(name=name)
    try:
        assert snapshot.snapshot_id and any(name in n for n in snapshot.names)
        by_source = Sandbox.list_snapshots(sandbox_id=sandbox.sandbox_id).next_items()
        assert snapshot.snapshot_id in {s.snapshot_id for s in by_source}
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name=name).next_items()] == [
            snapshot.snapshot_id
        ]
        assert Sandbox.list_snapshots(name=name + "-none").next_items() == []
        one = Sandbox.create(snapshot.snapshot_id, timeout=SANDBOX_TIMEOUT)
        two = Sandbox.create(snapshot.snapshot_id, timeout=SANDBOX_TIMEOUT)
        try:
            assert one.files.read("/home/user/state.txt") == "original"
            one.files.write("/home/user/state.txt", "changed")
            assert two.files.read("/home/user/state.txt") == "original"
        finally:
            one.kill()
            two.kill()
    finally:
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
    assert Sandbox.delete_snapshot(snapshot.snapshot_id) is False


def test_a_fork_copies_the_filesystem_and_is_independent(sandbox: Sandbox) -> None:
    sandbox.files.write("/home/user/state.txt", "before fork")
    forks = sandbox.fork(count=2, timeout=120)
    assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
    try:
        first, second = forks
        assert isinstance(first, Sandbox) and isinstance(second, Sandbox)
        assert len({sandbox.sandbox_id, first.sandbox_id, second.sandbox_id}) == 3
        assert sandbox.is_running() and first.is_running()
        assert first.files.read("/home/user/state.txt") == "before fork"
        first.files.write("/home/user/state.txt", "in fork")
        assert sandbox.files.read("/home/user/state.txt") == "before fork"
        assert second.files.read("/home/user/state.txt") == "before fork"
    finally:
        for fork in forks:
            if isinstance(fork, Sandbox):
                fork.kill()


def test_a_killed_sandbox_cannot_be_forked_or_snapshotted() -> None:
    box = Sandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT)
    box.kill()
    with pytest.raises(SandboxNotFoundException):
        box.fork()
    with pytest.raises(SandboxNotFoundException):
        box.create_snapshot()


async def test_async_snapshot_and_fork(async_sandbox: AsyncSandbox) -> None:
    await async_sandbox.files.write("/home/user/a.txt", "async")
    snapshot = await async_sandbox.create_snapshot()
    try:
        listed = await AsyncSandbox.list_snapshots(sandbox_id=async_sandbox.sandbox_id).next_items()
        assert snapshot.snapshot_id in {s.snapshot_id for s in listed}
        child = await AsyncSandbox.create(snapshot.snapshot_id, timeout=SANDBOX_TIMEOUT)
        try:
            assert await child.files.read("/home/user/a.txt") == "async"
        finally:
            await child.kill()
    finally:
        assert await AsyncSandbox.delete_snapshot(snapshot.snapshot_id) is True
    (fork,) = await async_sandbox.fork()
    assert isinstance(fork, AsyncSandbox)
    try:
        assert await fork.files.read("/home/user/a.txt") == "async"
    finally:
        await fork.kill()
