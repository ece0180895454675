"""What someone coming from E2B's SDK writes, against a real server (issue 10, item 9).

E2B's forms work where they mean one thing in Corral too; where they don't (root), the
error says why and what to do instead.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest

from corral import AsyncSandbox, Limits, Sandbox, WriteEntry
from corral.errors import CommandError, InvalidRequest
from tests.conftest import LiveServer, opts

pytestmark = pytest.mark.usefixtures("sandbox_host")


class E2BWriteEntry(NamedTuple):
    """Shaped like `e2b.WriteEntry`: any object with `path` and `data` is an entry."""

    path: str
    data: str | bytes


# -- sync ----------------------------------------------------------------------------------


def test_sync_kill_by_id_on_the_class(server: LiveServer) -> None:
    sbx = Sandbox.create(timeout=120, **opts(server))
    try:
        assert Sandbox.kill(sbx.sandbox_id, **opts(server)) is True
        assert sbx.get_info().state == "killed"
        assert Sandbox.kill(sbx.sandbox_id, **opts(server)) is False  # already gone
        assert Sandbox.kill(f"sbx-{secrets.token_hex(8)}", **opts(server)) is False
        with pytest.raises(InvalidRequest, match="sandbox id as a str"):
            Sandbox.kill(sbx)  # type: ignore[arg-type]
    finally:
        sbx.close()

    other = Sandbox.create(timeout=120, **opts(server))
    other.kill()  # the instance form is unchanged
    assert other.get_info().state == "killed"
    other.kill()  # killing it twice is no error, as its docstring says
    other.close()
    with Sandbox.create(timeout=120, **opts(server)) as third:
        third.kill()  # then the `with` block's own kill at its end: no error either


def test_sync_constructor_starts_a_sandbox_like_create(server: LiveServer) -> None:
    with Sandbox(timeout=120, envs={"WHO": "e2b"}, **opts(server)) as sbx:
        assert sbx.is_running()
        assert sbx.commands.run("echo $WHO").stdout == "e2b\n"
    assert sbx.get_info().state == "killed"
    sbx.close()
    with pytest.raises(InvalidRequest, match=r"Sandbox\.create"):
        Sandbox(sbx._async)  # type: ignore[arg-type]


def test_sync_user_root_runs_as_root_when_the_server_is_root_and_user_works(
    server: LiveServer,
) -> None:
    with Sandbox.create(timeout=120, **opts(server)) as sbx:
        if os.geteuid() == 0:
            assert sbx.commands.run("id -u", user="root").stdout == "0\n"
        else:  # rootless: one id per sandbox
            with pytest.raises(CommandError, match="server runs as root"):
                sbx.commands.run("id -u", user="root")
            assert sbx.commands.list() == []  # nothing was started
        assert sbx.commands.run("whoami", user="user").stdout == "user\n"
        assert sbx.commands.run("whoami").stdout == "user\n"


def test_sync_read_formats_and_write_entries(server: LiveServer) -> None:
    with Sandbox.create(timeout=120, **opts(server)) as sbx:
        infos = sbx.files.write(
            [WriteEntry("a.txt", "héllo"), E2BWriteEntry("/tmp/b.bin", bytes(range(256)))]
        )
        assert [i.path for i in infos] == ["/workspace/a.txt", "/tmp/b.bin"]
        assert sbx.files.read("a.txt") == "héllo"
        assert sbx.files.read("a.txt", format="text") == "héllo"
        assert sbx.files.read("/tmp/b.bin", format="bytes") == bytes(range(256))
        big = bytes(range(256)) * 12_000  # 3 MiB: several chunks
        sbx.files.write("big.bin", big)
        chunks = list(sbx.files.read("big.bin", format="stream"))
        assert b"".join(chunks) == big
        with pytest.raises(InvalidRequest, match="'text', 'bytes' or 'stream'"):
            sbx.files.read("a.txt", format="blob")  # type: ignore[call-overload]
        with pytest.raises(InvalidRequest, match="WriteEntry"):
            sbx.files.write([("c.txt", "x")])  # type: ignore[list-item]
        assert not sbx.files.exists("c.txt")  # a bad list writes nothing


# -- async ---------------------------------------------------------------------------------


async def test_async_kill_by_id_constructor_and_user(server: LiveServer) -> None:
    with pytest.raises(InvalidRequest, match=r"AsyncSandbox\.create"):
        AsyncSandbox()
    sbx = await AsyncSandbox.create(timeout=120, **opts(server))
    try:
        if os.geteuid() == 0:
            assert (await sbx.commands.run("whoami", user="root")).stdout == "root\n"
        assert (await sbx.commands.run("whoami", user="user")).stdout == "user\n"
        assert await AsyncSandbox.kill(sbx.sandbox_id, **opts(server)) is True
        assert (await sbx.get_info()).state == "killed"
        assert await AsyncSandbox.kill(sbx.sandbox_id, **opts(server)) is False
    finally:
        await sbx.aclose()


async def test_async_read_formats_and_write_entries(server: LiveServer) -> None:
    async with await AsyncSandbox.create(timeout=120, **opts(server)) as sbx:
        infos = await sbx.files.write([WriteEntry("x/a.txt", "one"), WriteEntry("b", b"\x00")])
        assert [i.path for i in infos] == ["/workspace/x/a.txt", "/workspace/b"]
        assert await sbx.files.read("x/a.txt", format="bytes") == b"one"
        stream: AsyncIterator[bytes] = await sbx.files.read("b", format="stream")
        assert b"".join([chunk async for chunk in stream]) == b"\x00"
        with pytest.raises(InvalidRequest, match="needs the data"):
            await sbx.files.write("c.txt")  # type: ignore[arg-type]


def test_a_zero_limit_is_refused_not_taken_as_the_default(server: LiveServer) -> None:
    for limits in (Limits(memory_mib=0), Limits(cpu=0), Limits(pids=-1), Limits(disk_mib=0)):
        with pytest.raises(InvalidRequest, match="positive number, or None"):
            Sandbox.create(limits=limits, metadata={"by": "zero-limit"}, **opts(server))
    assert Sandbox.list(metadata={"by": "zero-limit"}, **opts(server)) == []
