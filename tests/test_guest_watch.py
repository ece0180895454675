"""The guest agent's E2B-facing file calls: watches (inotify), in-place writes, file
metadata (``user.e2b.*`` xattrs), entry details and paths from the home directory.

Against the real agent run as a plain subprocess on the host (as tests/test_guest.py):
the agent's own behaviour, without a sandbox around it.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral import errors
from corral.guest import GuestConnection
from tests.test_guest import running_agent

pytestmark = pytest.mark.integration


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[GuestConnection]:
    async with running_agent(tmp_path) as running:
        yield running.guest


async def test_a_fresh_in_place_upload_is_create_chmod_write(
    guest: GuestConnection, tmp_path: Path
) -> None:
    # E2B's clients count exactly three events for a new file, the first a create.
    (tmp_path / "w").mkdir()
    watch = await guest.watch("w")
    await guest.write_file("w/new.txt", b"hello", in_place=True)
    await guest.sync()
    events = watch.take()
    assert [(e.type, e.name) for e in events] == [
        ("create", "new.txt"),
        ("chmod", "new.txt"),
        ("write", "new.txt"),
    ]
    await guest.write_file("w/new.txt", b"again", in_place=True)
    await guest.sync()
    assert "write" in [e.type for e in watch.take()]
    await watch.aclose()


async def test_recursive_watch_follows_new_directories(
    guest: GuestConnection, tmp_path: Path
) -> None:
    (tmp_path / "r" / "old").mkdir(parents=True)
    watch = await guest.watch("r", recursive=True, entries=True)
    await guest.write_file("r/old/a.txt", b"a", in_place=True)
    await guest.make_dir("r/new")
    await guest.write_file("r/new/b.txt", b"b", in_place=True)
    await guest.remove("r/old/a.txt")
    await guest.sync()
    events = [(e.type, e.name) for e in watch.take()]
    assert events[0] == ("create", "old/a.txt")
    assert ("create", "new") in events
    assert ("write", "new/b.txt") in events
    assert events[-1] == ("remove", "old/a.txt")
    await watch.aclose()


async def test_watch_entries_and_wait(guest: GuestConnection, tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    watch = await guest.watch("e", entries=True)
    await guest.write_file("e/x", b"12345", in_place=True)
    events = await watch.wait()
    assert events[0].entry is not None and events[0].entry.path == str(tmp_path / "e" / "x")
    await watch.aclose()


async def test_watch_refuses_a_missing_directory_and_a_file(
    guest: GuestConnection, tmp_path: Path
) -> None:
    with pytest.raises(errors.FileNotFound):
        await guest.watch("missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(errors.NotADirectory):
        await guest.watch("f")


async def test_metadata_is_replaced_by_each_write(guest: GuestConnection, tmp_path: Path) -> None:
    info = await guest.write_file("m.txt", b"x", metadata={"author": "ann", "k": "v"})
    assert info.metadata == {"author": "ann", "k": "v"}
    info = await guest.write_file("m.txt", b"y", in_place=True, metadata={"k": "w"})
    assert info.metadata == {"k": "w"}
    assert os.getxattr(tmp_path / "m.txt", "user.e2b.k") == b"w"
    info = await guest.write_file("m.txt", b"z", in_place=True, metadata={})
    assert info.metadata is None
    os.setxattr(tmp_path / "m.txt", "user.e2b.set-outside", b"1")
    assert (await guest.stat("m.txt")).metadata == {"set-outside": "1"}
    with pytest.raises(errors.InvalidRequest, match="printable ASCII"):
        await guest.write_file("bad.txt", b"x", metadata={"bad key": "v"})
    assert not (tmp_path / "bad.txt").exists()  # a refused write changes nothing


async def test_entries_name_owner_and_resolve_symlinks(
    guest: GuestConnection, tmp_path: Path
) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.txt").write_text("t")
    os.symlink("t.txt", tmp_path / "d" / "link")
    info = await guest.stat("d/link")
    assert info.type == "symlink" and info.symlink_target == "t.txt"
    assert info.resolved == str(tmp_path / "d" / "t.txt") and info.resolved_type == "file"
    assert info.owner and info.group
    os.symlink("nowhere", tmp_path / "d" / "dangling")
    dangling = await guest.stat("d/dangling")
    assert dangling.resolved_type is None


async def test_home_resolves_relative_paths_from_the_users_home(guest: GuestConnection) -> None:
    home = pwd.getpwuid(os.getuid()).pw_dir
    info = await guest.stat(".", home=True)
    assert info.path == os.path.normpath(home)


async def test_in_place_overwrite_keeps_the_files_mode(
    guest: GuestConnection, tmp_path: Path
) -> None:
    (tmp_path / "kept").write_bytes(b"old content")
    os.chmod(tmp_path / "kept", 0o600)
    info = await guest.write_file("kept", b"new", in_place=True, mode=0o644)
    assert (info.mode, (tmp_path / "kept").read_bytes()) == (0o600, b"new")
    fresh = await guest.write_file("fresh", b"x", in_place=True, mode=0o640)
    assert fresh.mode == 0o640
