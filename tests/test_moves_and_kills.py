"""Moves across the sandbox's mounts, and commands that end because their sandbox is killed.

/workspace, /tmp and the home directory are separate mounts, so rename(2) between them
fails with EXDEV: the agent copies and removes instead, as `mv` does, without stalling its
other calls, and leaves the source as it was when the copy fails. Killing a sandbox while
a command streams is a normal end of that command (reason "killed"), never an internal
error in the server's log. Everything runs through the real agent in real sandboxes, and
through a live server where the API is concerned.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from corral import AsyncSandbox, errors
from corral.config import Settings
from corral.guest import EntryInfo
from corral.isolation import Engine, Limits, Sandbox
from tests.conftest import LiveServer, require_backend, start_server
from tests.kit.polling import until

pytestmark = [pytest.mark.sandbox]

# A tree with what a move must keep: nested directories and their modes, an empty one,
# an executable, a symlink (relative, and one dangling), and times set in the past.
TREE = """
set -e
mkdir -p d/sub/deeper d/empty
printf 'alpha' > d/a.txt
printf 'beta' > d/sub/b.sh
head -c 300000 /dev/urandom > d/sub/deeper/blob
chmod 640 d/a.txt; chmod 755 d/sub/b.sh; chmod 750 d/empty; chmod 700 d/sub/deeper
ln -s a.txt d/link
ln -s nowhere d/sub/dangling
touch -h -d '2001-02-03 04:05:06' d/link
touch -d '2001-02-03 04:05:06' d/a.txt d/sub/b.sh d/sub/deeper/blob d/sub/deeper d/empty
chmod 555 d/sub
touch -d '2002-03-04 05:06:07' d/sub d
"""


def shape(entries: list[EntryInfo], top: str) -> dict[str, tuple[object, ...]]:
    """What a move must keep of each entry, by its path under `top`."""
    return {
        e.path.removeprefix(top): (e.type, e.mode, e.size, e.mtime, e.symlink_target)
        for e in entries
    }


async def tree_of(box: Sandbox, top: str) -> dict[str, tuple[object, ...]]:
    entries = await box.list_dir(top, depth=5)
    return {"": shape([await box.stat(top)], top)[""], **shape(entries, top)}


async def digest(box: Sandbox, path: str) -> str:
    return hashlib.sha256(await box.read_bytes(path)).hexdigest()


async def hidden_copies(box: Sandbox, directory: str) -> list[str]:
    return [e.name for e in await box.list_dir(directory) if ".corral-" in e.name]


# -- moves through the real agent ---------------------------------------------------------


async def test_a_tree_moves_across_mounts_with_its_modes_times_and_symlinks(
    sandbox: Sandbox,
) -> None:
    made = await sandbox.run(["sh", "-c", TREE], cwd="/tmp")
    assert made.ok, made
    before = await tree_of(sandbox, "/tmp/d")
    blob = await digest(sandbox, "/tmp/d/sub/deeper/blob")

    entry = await sandbox.rename("/tmp/d", "/workspace/d")

    assert entry is not None and (entry.path, entry.type) == ("/workspace/d", "dir")
    assert await tree_of(sandbox, "/workspace/d") == before
    assert await digest(sandbox, "/workspace/d/sub/deeper/blob") == blob
    assert await sandbox.read_bytes("/workspace/d/link") == b"alpha"  # still a symlink
    with pytest.raises(errors.FileNotFound):
        await sandbox.stat("/tmp/d")
    assert await hidden_copies(sandbox, "/workspace") == []

    # On to the home directory and back to /tmp: a file, and a symlink kept as one.
    home = (await sandbox.run(["sh", "-c", "echo -n $HOME"])).stdout.decode()
    moved = await sandbox.rename("/workspace/d/a.txt", f"{home}/a.txt")
    assert moved is not None and (moved.mode, moved.size) == (0o640, 5)
    assert moved.mtime == before["/a.txt"][3]
    link = await sandbox.rename("/workspace/d/link", "/tmp/link")
    assert link is not None and (link.type, link.symlink_target) == ("symlink", "a.txt")


async def test_a_move_across_mounts_replaces_as_rename_does(sandbox: Sandbox) -> None:
    """A file replaces a file, a directory an empty directory; anything else is refused
    before copying, and the source stays as it was."""
    await sandbox.write_file("/tmp/f", b"new")
    await sandbox.write_file("/workspace/f", b"old")
    with pytest.raises(errors.FileExists, match="overwrite=True"):
        await sandbox.rename("/tmp/f", "/workspace/f", overwrite=False)
    assert await sandbox.read_bytes("/workspace/f") == b"old"
    await sandbox.rename("/tmp/f", "/workspace/f")
    assert await sandbox.read_bytes("/workspace/f") == b"new"

    await sandbox.write_file("/tmp/dir/inside", b"x")
    await sandbox.make_dir("/workspace/empty")
    await sandbox.write_file("/workspace/full/other", b"y")
    await sandbox.write_file("/tmp/g", b"g")
    refusals = [
        ("/tmp/dir", "/workspace/full", errors.DirectoryNotEmpty),
        ("/tmp/dir", "/workspace/f", errors.NotADirectory),
        ("/tmp/g", "/workspace/full", errors.IsADirectory),
        ("/tmp/missing", "/workspace/m", errors.FileNotFound),
    ]
    for src, dst, error in refusals:
        with pytest.raises(error):
            await sandbox.rename(src, dst)
    assert await sandbox.read_bytes("/tmp/dir/inside") == b"x"
    assert await sandbox.read_bytes("/tmp/g") == b"g"
    assert await sandbox.read_bytes("/workspace/full/other") == b"y"

    await sandbox.rename("/tmp/dir", "/workspace/empty")  # an empty directory is replaced
    assert await sandbox.read_bytes("/workspace/empty/inside") == b"x"
    assert await hidden_copies(sandbox, "/workspace") == []


async def test_a_big_move_does_not_stall_other_calls(sandbox: Sandbox) -> None:
    """While 128 MiB are copied, the agent answers other calls, and the destination
    appears only whole."""
    made = await sandbox.run(["sh", "-c", "head -c 134217728 /dev/zero > /tmp/big"])
    assert made.ok, made
    moving = asyncio.create_task(sandbox.rename("/tmp/big", "/workspace/big"))
    partial_copies_seen = 0
    while not moving.done():
        for e in await sandbox.list_dir("/workspace"):
            if ".corral-" in e.name:  # the copy in progress: this call was served meanwhile
                partial_copies_seen += 1
            elif e.name == "big":  # never half there
                assert e.size == 1 << 27
    entry = await moving
    assert entry is not None and entry.size == 1 << 27
    assert partial_copies_seen > 0
    with pytest.raises(errors.FileNotFound):
        await sandbox.stat("/tmp/big")


async def test_no_space_during_a_move_leaves_the_source_intact(
    engine: Engine, settings: Settings
) -> None:
    """/workspace and /tmp share the sandbox's disk: moving 12 MiB with 20 MiB of disk
    cannot fit both copies. The copy is discarded and the source is as it was."""
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace", limits=Limits(disk_mib=20))
    try:
        made = await box.run(["sh", "-c", "head -c 12582912 /dev/urandom > /tmp/big"])
        assert made.ok, made
        before = await digest(box, "/tmp/big")
        with pytest.raises(errors.NoSpace, match="/workspace/big"):
            await box.rename("/tmp/big", "/workspace/big")
        assert await digest(box, "/tmp/big") == before
        with pytest.raises(errors.FileNotFound):
            await box.stat("/workspace/big")
        assert await hidden_copies(box, "/workspace") == []
        # The space the failed copy took is free again.
        assert (await box.run(["sh", "-c", "head -c 4194304 /dev/zero > /workspace/x"])).ok
    finally:
        await box.destroy()


async def test_an_unsupported_move_is_a_plain_bad_request(sandbox: Sandbox) -> None:
    """A FIFO cannot be copied across mounts: the caller is told so, and not that the
    agent is too old (that is said only of an op the agent does not know)."""
    assert (await sandbox.run(["mkfifo", "/tmp/pipe"])).ok
    with pytest.raises(errors.InvalidRequest, match="FIFO: moving one across mounts") as refused:
        await sandbox.rename("/tmp/pipe", "/workspace/pipe")
    assert "older" not in str(refused.value)
    assert (await sandbox.stat("/tmp/pipe")).type == "other"
    moved = await sandbox.rename("/tmp/pipe", "/tmp/pipe2")  # within one mount: rename(2)
    assert moved is not None and moved.path == "/tmp/pipe2"

    guest = sandbox._running_guest()
    with pytest.raises(errors.GuestError, match=r"unknown op 'bogus'.*older than this client"):
        await guest.request("bogus")


# -- commands of a sandbox that is destroyed ------------------------------------------------


async def test_destroying_a_sandbox_ends_its_commands_as_killed(
    engine: Engine, settings: Settings
) -> None:
    require_backend(settings, "namespace")
    box = await engine.create(isolation="namespace")
    command = await box.exec(["sh", "-c", "echo started; exec sleep 60"])
    chunks = aiter(command)
    assert (await anext(chunks)).data == b"started\n"
    await box.write_file("/tmp/big", b"x" * (1 << 20))
    reading = box.read_file("/tmp/big")
    assert await anext(reading)
    await box.destroy()
    assert [chunk async for chunk in chunks] == []  # the output ends, with no error
    result = await command.wait()
    assert (result.reason, result.exit_code, result.signal) == ("killed", 137, 9)
    assert result.output_bytes == len(b"started\n")
    assert result.error and "was killed" in result.error
    with pytest.raises(errors.SandboxNotRunning, match="was killed"):  # not a GuestError
        async for _ in reading:
            pass


# -- through a live server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(settings: Settings) -> Iterator[LiveServer]:
    """A server of this module's own, so its log holds only these tests' lines."""
    require_backend(settings, "namespace")
    server = start_server(
        settings, settings.runtime_dir / f"moves-{secrets.token_hex(4)}", pool_size=0
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def remote(live: LiveServer) -> AsyncIterator[AsyncSandbox]:
    sbx = await AsyncSandbox.create(server=live.url, api_key=live.key)
    try:
        yield sbx
    finally:
        with contextlib.suppress(errors.SandboxNotRunning):  # a test killed it
            await sbx.kill()
        await sbx.aclose()


def failed_rpcs(live: LiveServer) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in live.log.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("msg") == "rpc failed"]


async def test_a_stream_ends_as_killed_when_its_sandbox_is_killed(
    live: LiveServer, remote: AsyncSandbox
) -> None:
    running = asyncio.create_task(remote.commands.run("sleep 60"))

    async def started() -> bool:
        return [p.cmd for p in await remote.commands.list()] == ["sleep 60"]

    await until(started, "sleep 60 to start")
    await remote.kill()
    result = await asyncio.wait_for(running, 20)
    assert (result.reason, result.exit_code, result.signal) == ("killed", 137, 9)
    assert failed_rpcs(live) == []


async def test_moves_across_mounts_through_the_api(live: LiveServer, remote: AsyncSandbox) -> None:
    await remote.files.write("/tmp/notes/a.txt", "hello")
    entry = await remote.files.rename("/tmp/notes", "/workspace/notes")
    assert (entry.path, entry.type) == ("/workspace/notes", "dir")
    assert await remote.files.read("/workspace/notes/a.txt") == "hello"
    assert not await remote.files.exists("/tmp/notes")

    assert (await remote.commands.run("mkfifo /tmp/pipe")).ok
    with pytest.raises(errors.InvalidRequest, match="not supported") as refused:
        await remote.files.rename("/tmp/pipe", "/workspace/pipe")
    assert "older" not in str(refused.value)
    assert failed_rpcs(live) == []  # the caller's mistake is no failure of the server
