"""Snapshots of layer-template sandboxes (`Sandbox.snapshot`) and flattening (`flatten`):
real sandboxes on the Debian base of the local archive, real overlay mounts, a real store.

A snapshot is the template's layers plus one layer of what the sandbox changed; a
template of those digests starts sandboxes that see the changes (deleted files absent,
replaced directories replaced), while the snapshotted sandbox keeps running. What a
hostile sandbox plants in its upper dir (devices, setuid files, privileged xattrs,
symlinks to host paths) is neutralised or harmless in the layer."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import InvalidLayer, InvalidRequest, QuotaExceeded, SnapshotUnavailable
from corral.images import Layer, LayerStore, flatten, tree_digest
from corral.isolation import Engine, Sandbox
from corral.isolation.rootfs import upper_dir
from corral.isolation.sandbox import SandboxState
from tests.conftest import require_backend
from tests.kit.debian import needs_archive
from tests.kit.polling import until
from tests.test_layer_sandboxes import leftovers

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]

_OPAQUE = "trusted.overlay.opaque"

# Changes of every kind a sandbox makes to its `/`: a new file in a root-owned place, a
# modified template file, a deleted template file, a template directory replaced by a new
# one (an opaque dir in the upper dir), a file in the workspace.
_CHANGES = (
    "set -e; "
    "printf '#!/bin/sh\\necho tool ran\\n' > /usr/local/bin/tool && chmod 755 /usr/local/bin/tool; "
    "echo appended >> /etc/os-release; "
    "rm /etc/debian_version; "
    "rm -r /usr/share/doc/apt && mkdir /usr/share/doc/apt && echo new > /usr/share/doc/apt/only; "
    "echo data > /workspace/data.txt"
)


async def _sh(box: Sandbox, script: str) -> str:
    ran = await box.run(["sh", "-c", script])
    assert ran.exit_code == 0, ran.stderr.decode()
    return ran.stdout.decode()


def _tree(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            yield path, os.lstat(path)


async def test_a_snapshot_starts_sandboxes_that_see_the_changes_and_the_sandbox_runs_on(
    engine_debian: Engine, debian_base: tuple[LayerStore, Layer]
) -> None:
    store, base = debian_base
    first = await engine_debian.create(template="debian-root", isolation="namespace")
    try:
        await _sh(first, _CHANGES)
        digests = await first.snapshot(store)
        assert first.state is SandboxState.RUNNING
        assert digests[:-1] == (base.digest,) and digests[-1] != base.digest
        # It runs on, and what it does now is not in the snapshot.
        await _sh(first, "echo later > /workspace/later.txt")
    finally:
        await first.destroy()
    layer = store.get(digests[-1])
    assert tree_digest(layer.path) == layer.digest
    # Whiteouts and the opaque dir came back as overlayfs' own, under the store's checks.
    whiteout = os.lstat(layer.path / "etc" / "debian_version")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert os.getxattr(layer.path / "usr/share/doc/apt", _OPAQUE) == b"y"
    assert not list(layer.path.rglob(".wh.*"))
    # Owners are the ids inside the sandbox's user namespace, never host ids.
    assert all(st.st_uid < 65536 and st.st_gid < 65536 for _, st in _tree(layer.path))

    engine_debian.templates.add("snap", store, digests, user="root")
    second = await engine_debian.create(template="snap", isolation="namespace")
    try:
        assert await _sh(second, "tool") == "tool ran\n"
        assert (await _sh(second, "tail -1 /etc/os-release")) == "appended\n"
        assert await _sh(second, "ls /usr/share/doc/apt") == "only\n"
        assert await _sh(second, "cat /workspace/data.txt") == "data\n"
        ran = await second.run(["sh", "-c", "ls /etc/debian_version /workspace/later.txt"])
        assert ran.exit_code != 0 and ran.stderr.decode().count("No such file") == 2
        # What the first sandbox's user made is the second one's user's: it may write it.
        owner = await _sh(second, "stat -c %u /workspace/data.txt /usr/local/bin/tool; id -u")
        assert len(set(owner.split())) == 1, owner
        await _sh(second, "echo more >> /workspace/data.txt && echo x >> /etc/os-release")
    finally:
        await second.destroy()
        engine_debian.templates.remove("snap")
    assert tree_digest(base.path) == base.digest  # the template's layer never changes


async def test_a_paused_sandbox_is_snapshotted_and_stays_paused(
    engine_debian: Engine, debian_base: tuple[LayerStore, Layer]
) -> None:
    store, _ = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    try:
        await _sh(box, "echo paused > /workspace/p.txt")
        await box.pause()
        digests = await box.snapshot(store)
        assert box.state is SandboxState.PAUSED
        assert (store.get(digests[-1]).path / "workspace" / "p.txt").read_text() == "paused\n"
        await box.resume()
        assert await _sh(box, "cat /workspace/p.txt") == "paused\n"
    finally:
        await box.destroy()


async def test_a_flattened_snapshot_is_one_layer_with_the_same_tree(
    engine_debian: Engine, debian_base: tuple[LayerStore, Layer]
) -> None:
    store, _ = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    try:
        await _sh(box, _CHANGES)
        digests = await box.snapshot(store)
    finally:
        await box.destroy()
    flat = flatten(store, digests)
    assert flat.digest not in digests
    # No whiteouts, no opaque dirs: a deleted file is simply absent.
    for path, st in _tree(flat.path):
        assert not stat.S_ISCHR(st.st_mode), path
        if stat.S_ISDIR(st.st_mode):
            assert _OPAQUE not in os.listxattr(path), path
    assert not (flat.path / "etc" / "debian_version").exists()
    assert os.listdir(flat.path / "usr/share/doc/apt") == ["only"]
    # Sandboxes of the layers and of the flattened layer see the same tree.
    listing = "find / -xdev -printf '%p %y %m %U %G %s %l\\n' | sort"
    seen = []
    for name, layers in (("layered", digests), ("flat", (flat.digest,))):
        engine_debian.templates.add(name, store, layers, user="root")
        box = await engine_debian.create(template=name, isolation="namespace")
        try:
            seen.append(await _sh(box, listing))
        finally:
            await box.destroy()
            engine_debian.templates.remove(name)
    assert seen[0] == seen[1]
    assert "/usr/share/doc/apt/only" in seen[0] and "/etc/debian_version" not in seen[0]


async def test_a_snapshot_over_its_quota_is_refused_and_stores_nothing(
    engine_debian: Engine, debian_base: tuple[LayerStore, Layer]
) -> None:
    store, _ = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    try:
        await _sh(box, "head -c 4194304 /dev/urandom > /workspace/big")
        before = {layer.digest for layer in store.layers()}
        with pytest.raises(InvalidRequest, match="max_bytes=-1 must be"):
            await box.snapshot(store, max_bytes=-1)
        with pytest.raises(InvalidRequest, match="max_bytes=-1 must be"):
            flatten(store, [store.layers()[0].digest], max_bytes=-1)
        with pytest.raises(QuotaExceeded, match="more than 1048576 bytes"):
            await box.snapshot(store, max_bytes=1 << 20)
        assert {layer.digest for layer in store.layers()} == before
        assert list((store.root / "staging").iterdir()) == []
        # Thawed after the refusal.
        assert box.state is SandboxState.RUNNING
        assert await _sh(box, "echo alive") == "alive\n"
    finally:
        await box.destroy()


async def test_a_host_template_sandbox_cannot_be_snapshotted(
    engine: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> None:
    require_backend(settings, "namespace")
    store, _ = debian_base
    box = await engine.create(template="host", isolation="namespace")
    try:
        with pytest.raises(SnapshotUnavailable, match="root is the host's"):
            await box.snapshot(store)
        assert await _sh(box, "echo alive") == "alive\n"
    finally:
        await box.destroy()


@pytest.mark.hostile
async def test_what_a_hostile_sandbox_plants_in_its_upper_dir_is_neutralised(
    engine_debian: Engine, debian_base: tuple[LayerStore, Layer]
) -> None:
    store, _ = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    try:
        plant = """if True:
            import os
            open('/workspace/suid', 'w').write('x')
            os.chmod('/workspace/suid', 0o4755)
            os.symlink('/etc/shadow', '/workspace/shadow')
            os.symlink('/', '/workspace/hostroot')
            for attempt in (
                lambda: os.mknod('/workspace/null', 0o20666, os.makedev(1, 3)),
                lambda: os.setxattr('/workspace/suid', 'trusted.evil', b'1'),
            ):
                try:
                    attempt()
                    print('allowed')
                except OSError as exc:
                    print(exc.errno)
        """
        out = await _sh(box, f"python3 -c {_quote(plant)}")
        assert "allowed" not in out  # no device nodes, no trusted xattrs from inside
        # A kernel that let it: planted straight into its upper dir from the host.
        upper = upper_dir(box.footprint)
        os.mknod(upper / "workspace" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.setxattr(upper / "workspace" / "suid", "trusted.evil", b"1")
        os.setxattr(upper / "workspace" / "suid", "trusted.overlay.redirect", b"/etc")
        with pytest.raises(InvalidLayer, match="partly in a lower layer"):
            await box.snapshot(store)
        os.removexattr(upper / "workspace" / "suid", "trusted.overlay.redirect")
        digests = await box.snapshot(store)
    finally:
        await box.destroy()
    layer = store.get(digests[-1])
    workspace = layer.path / "workspace"
    assert not (workspace / "null").exists() and not (workspace / "null").is_symlink()
    assert os.lstat(workspace / "suid").st_mode & 0o6000 == 0
    assert os.listxattr(workspace / "suid") == []
    assert os.readlink(workspace / "shadow") == "/etc/shadow"  # a link, resolved inside
    assert os.readlink(workspace / "hostroot") == "/"
    assert any("device node dropped" in line for line in layer.neutralised)
    assert any("setuid" in line for line in layer.neutralised)
    assert any("trusted.evil" in line for line in layer.neutralised)
    # In a sandbox of it, the links lead into its own root, not the host's.
    engine_debian.templates.add("planted", store, digests, user="root")
    other = await engine_debian.create(template="planted", isolation="namespace")
    try:
        assert (
            await _sh(other, "ls -d /workspace/hostroot/.corral") == "/workspace/hostroot/.corral\n"
        )
        ran = await other.run(["cat", "/workspace/shadow"])
        assert ran.stdout != Path("/etc/shadow").read_bytes()
    finally:
        await other.destroy()
        engine_debian.templates.remove("planted")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


async def test_a_sandbox_destroyed_during_its_snapshot_stays_frozen_until_it_is_read(
    engine_debian: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> None:
    """Destroy thaws a sandbox to kill it: it waits for the snapshot's reader first, so the
    sandbox never runs while the host reads its upper dir."""
    store, _ = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    # Read first (paths in order), so the reader is still at work when destroy comes.
    await _sh(box, "mkdir /0 && head -c 67108864 /dev/urandom > /0/big && echo x > /workspace/x")
    snapshot = asyncio.create_task(box.snapshot(store))
    await asyncio.sleep(0.05)  # it has the sandbox frozen and is reading
    await box.destroy()
    digests = await snapshot
    layer = store.get(digests[-1])
    assert (layer.path / "0" / "big").stat().st_size == 64 << 20
    assert (layer.path / "workspace" / "x").read_text() == "x\n"
    # The kernel ends the lazily detached disk after writing its 64 MB back: not at once.
    await until(lambda: leftovers(settings, box.id) == [], "the sandbox's disk to go", timeout=30)


async def test_a_cancelled_snapshot_thaws_the_sandbox_once_its_read_ends(
    engine_debian: Engine, debian_base: tuple[LayerStore, Layer]
) -> None:
    store, _ = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    try:
        await _sh(box, "head -c 67108864 /dev/urandom > /workspace/big")
        snapshot = asyncio.create_task(box.snapshot(store))
        await asyncio.sleep(0.05)
        snapshot.cancel()
        with pytest.raises(asyncio.CancelledError):
            await snapshot
        assert box.state is SandboxState.RUNNING
        assert await _sh(box, "echo alive") == "alive\n"
    finally:
        await box.destroy()


async def test_a_running_sandbox_holds_its_layers_against_the_gc(
    engine_debian: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> None:
    """A template removed while its sandbox runs leaves the layers held by the sandbox: a
    collection spares them until it is destroyed."""
    store, _ = debian_base
    box = await engine_debian.create(template="debian-root", isolation="namespace")
    await _sh(box, "echo mine > /workspace/mine")
    extra = await box.snapshot(store)
    engine_debian.templates.add("short-lived", store, extra, user="root")
    other = await engine_debian.create(template="short-lived", isolation="namespace")
    await box.destroy()
    engine_debian.templates.remove("short-lived")
    try:
        assert store.holders(extra[-1]) == [other.id]
        keep = {layer.digest for layer in store.layers()} - {extra[-1]}
        assert store.collect(keep, min_age=0) == []
        assert await _sh(other, "cat /workspace/mine") == "mine\n"
    finally:
        await other.destroy()
    assert store.holders(extra[-1]) == []
    assert store.collect(keep, min_age=0) == [extra[-1]]
