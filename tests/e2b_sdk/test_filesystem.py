"""The official SDK's `sandbox.files`, sync and async, against a Corral server: read and
write (multipart, octet-stream, gzip), list with depth, info, exists, make_dir, remove,
rename, metadata, watching (the sync polling watcher, the async stream) and signed URLs
(with expiry, and never crossing to another sandbox)."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.error
import urllib.request
import uuid

import pytest
from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.filesystem.filesystem import WriteEntry

TEMPLATE = "base"
SANDBOX_TIMEOUT = 300


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- sync -------------------------------------------------------------------------------


def test_write_read_and_info(sandbox: Sandbox) -> None:
    name = unique("hello.txt")
    info = sandbox.files.write(name, "hello")
    assert info.path == f"/home/user/{name}" and info.type == FileType.FILE
    assert sandbox.files.read(name) == "hello"
    assert sandbox.files.read(name, format="bytes") == bytearray(b"hello")
    entry = sandbox.files.get_info(name)
    assert (entry.size, entry.mode, entry.permissions) == (5, 0o644, "-rw-r--r--")
    assert (entry.owner, entry.group) == ("user", "user")
    assert entry.modified_time.tzinfo is not None
    assert sandbox.files.exists(name) and not sandbox.files.exists(unique("missing"))
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(unique("missing"))
    with pytest.raises(FileNotFoundException):
        sandbox.files.get_info(unique("missing"))


def test_write_forms_and_gzip(sandbox: Sandbox) -> None:
    big = "streamed " * 100_000
    sandbox.files.write("octet.bin", io.BytesIO(big.encode()), use_octet_stream=True)
    assert sandbox.files.read("octet.bin") == big
    sandbox.files.write("gz.txt", big, gzip=True)
    assert sandbox.files.read("gz.txt", gzip=True) == big
    with sandbox.files.read("gz.txt", format="stream") as stream:
        assert b"".join(stream).decode() == big
    entries = [WriteEntry(path=f"multi/{i}.txt", data=f"file {i}") for i in range(3)]
    written = sandbox.files.write_files(entries)
    assert [w.path for w in written] == [f"/home/user/multi/{i}.txt" for i in range(3)]
    assert sandbox.files.read("multi/2.txt") == "file 2"
    sandbox.files.write("multi/2.txt", "overwritten")
    assert sandbox.files.read("multi/2.txt") == "overwritten"


def test_list_make_dir_remove_rename(sandbox: Sandbox) -> None:
    top = unique("tree")
    assert sandbox.files.make_dir(f"{top}/a/a1")
    assert not sandbox.files.make_dir(f"{top}/a/a1")
    sandbox.files.make_dir(f"{top}/b")
    sandbox.files.write(f"{top}/file.txt", "f")
    assert [e.name for e in sandbox.files.list(top)] == ["a", "b", "file.txt"]
    deep = sandbox.files.list(top, depth=2)
    assert [e.path for e in deep] == [
        f"/home/user/{top}/{p}" for p in ("a", "a/a1", "b", "file.txt")
    ]
    assert deep[0].type == FileType.DIR and deep[0].permissions == "drwxr-xr-x"
    moved = sandbox.files.rename(f"{top}/file.txt", f"{top}/moved.txt")
    assert moved.path == f"/home/user/{top}/moved.txt"
    with pytest.raises(FileNotFoundException):
        sandbox.files.rename(f"{top}/file.txt", f"{top}/again.txt")
    sandbox.files.remove(top)
    sandbox.files.remove(top)  # gone already: no error
    assert not sandbox.files.exists(top)


def test_symlinks_metadata_and_users(sandbox: Sandbox) -> None:
    sandbox.files.write("links/target.txt", "t", metadata={"author": "ann"})
    sandbox.commands.run("ln -s target.txt /home/user/links/link")
    link = sandbox.files.get_info("links/link")
    assert link.type == FileType.FILE
    assert link.symlink_target == "/home/user/links/target.txt"
    assert sandbox.files.get_info("links/target.txt").metadata == {"author": "ann"}
    assert sandbox.files.write("links/target.txt", "u").metadata is None  # replaced
    root = sandbox.files.write("/tmp/by-root.txt", "r", user="root")
    assert root.path == "/tmp/by-root.txt"
    assert sandbox.files.get_info("/tmp/by-root.txt").owner == "root"


def test_polling_watcher(sandbox: Sandbox) -> None:
    top = unique("watched")
    sandbox.files.make_dir(f"{top}/nested")
    handle = sandbox.files.watch_dir(top, recursive=True)
    sandbox.files.write(f"{top}/nested/new.txt", "content")
    events = handle.get_new_events()
    assert len(events) == 3
    assert (events[0].type, events[0].name) == (FilesystemEventType.CREATE, "nested/new.txt")
    handle.stop()
    with pytest.raises(FileNotFoundException):
        sandbox.files.watch_dir(unique("missing"))
    sandbox.files.write("plain.txt", "x")
    with pytest.raises(SandboxException):
        sandbox.files.watch_dir("plain.txt")


def test_signed_urls() -> None:
    first = Sandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT, secure=True)
    second = Sandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT, secure=True)
    try:
        for box in (first, second):
            box.files.write("same.txt", box.sandbox_id)
        for box in (first, second):  # each URL reads its own sandbox's file
            with urllib.request.urlopen(box.download_url("same.txt", "user")) as response:
                assert response.read().decode() == box.sandbox_id
        with urllib.request.urlopen(first.download_url("same.txt", "user", 120)) as response:
            assert response.status == 200
        expired = first.download_url("same.txt", "user", use_signature_expiration=-120)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(expired)
        assert refused.value.code == 401
        assert json.loads(refused.value.read()) == {
            "code": 401,
            "message": "signature is already expired",
        }
        second.kill()  # its URL no longer reaches anything, least of all `first`
        with pytest.raises(urllib.error.HTTPError) as gone:
            urllib.request.urlopen(second.download_url("same.txt", "user"))
        assert gone.value.code in (401, 502)
    finally:
        first.kill()
        second.kill()


# -- async ------------------------------------------------------------------------------


async def test_async_files(async_sandbox: AsyncSandbox) -> None:
    name = unique("async.txt")
    info = await async_sandbox.files.write(name, "async", metadata={"k": "v"})
    assert info.metadata == {"k": "v"}
    assert await async_sandbox.files.read(name) == "async"
    assert (await async_sandbox.files.get_info(name)).metadata == {"k": "v"}
    assert await async_sandbox.files.exists(name)
    top = unique("dir")
    assert await async_sandbox.files.make_dir(f"{top}/sub")
    assert [e.name for e in await async_sandbox.files.list(top)] == ["sub"]
    await async_sandbox.files.rename(name, f"{top}/{name}")
    await async_sandbox.files.remove(top)
    assert not await async_sandbox.files.exists(top)
    with pytest.raises(FileNotFoundException):
        await async_sandbox.files.read(name)


async def test_async_watch_stream(async_sandbox: AsyncSandbox) -> None:
    top = unique("stream")
    await async_sandbox.files.make_dir(top)
    received: list[FilesystemEvent] = []
    written = asyncio.Event()

    def on_event(event: FilesystemEvent) -> None:
        received.append(event)
        if event.type == FilesystemEventType.WRITE:
            written.set()

    handle = await async_sandbox.files.watch_dir(top, on_event=on_event, include_entry=True)
    await async_sandbox.files.write(f"{top}/w.txt", "watched")
    await asyncio.wait_for(written.wait(), 30)
    assert received[0].type == FilesystemEventType.CREATE and received[0].name == "w.txt"
    write = next(e for e in received if e.type == FilesystemEventType.WRITE)
    assert write.entry is not None and write.entry.path == f"/home/user/{top}/w.txt"
    await handle.stop()
    with pytest.raises(FileNotFoundException):
        await async_sandbox.files.watch_dir(unique("missing"), on_event=on_event)
