"""The Python SDK, sync and async, against a real server process."""

from __future__ import annotations

import asyncio
import inspect
import secrets

import pytest

import corral
from corral import AsyncSandbox, Sandbox
from corral.errors import (
    FileExists,
    FileNotFound,
    InvalidRequest,
    NotFound,
    SandboxNotRunning,
    ServerUnavailable,
    TemplateNotFound,
    Unauthenticated,
)
from tests.conftest import LiveServer, free_port, opts
from tests.kit.polling import until

# What the SDK lists, connects to and kills is the store's: on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.usefixtures("sandbox_host"), pytest.mark.every_database]


def test_public_names_are_exactly_all() -> None:
    for name in corral.__all__:
        assert getattr(corral, name) is not None, name
    public = {
        name
        for name, value in vars(corral).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(corral.__all__) - {"__version__"}


# -- sync ----------------------------------------------------------------------------------


def test_sync_run_files_and_kill_on_exit(server: LiveServer) -> None:
    chunks: list[str] = []
    with Sandbox.create(envs={"WHO": "world"}, timeout=120, **opts(server)) as sbx:
        result = sbx.commands.run("echo hello $WHO; echo oops >&2; exit 3", on_stdout=chunks.append)
        assert (result.stdout, result.stderr, result.exit_code) == ("hello world\n", "oops\n", 3)
        assert result.reason == "exited" and not result.ok  # a non-zero exit raises nothing
        assert chunks == ["hello world"]  # lines without their newline: print prints once
        assert sbx.commands.run(["python3", "-c", "print(6 * 7)"]).stdout == "42\n"

        entry = sbx.files.write("dir/notes.txt", "héllo")
        assert entry.path == "/workspace/dir/notes.txt" and entry.size == len("héllo".encode())
        assert sbx.files.read("dir/notes.txt") == "héllo"
        sbx.files.write("bin", bytes(range(256)))
        assert sbx.files.read_bytes("bin") == bytes(range(256))
        assert [e.name for e in sbx.files.list("dir")] == ["notes.txt"]
        assert sbx.files.exists("dir/notes.txt") and not sbx.files.exists("nope")
        assert sbx.files.make_dir("a/b") and not sbx.files.make_dir("a/b")
        moved = sbx.files.rename("dir/notes.txt", "a/b/moved.txt")
        assert moved.path == "/workspace/a/b/moved.txt"
        with pytest.raises(FileNotFound, match=r"dir/notes\.txt"):
            sbx.files.read("dir/notes.txt")
        sbx.files.write("other", "x")
        with pytest.raises(FileExists):
            sbx.files.rename("other", "a/b/moved.txt", overwrite=False)
        sbx.files.remove("a")
        assert not sbx.files.exists("a/b/moved.txt")
        sandbox_id = sbx.sandbox_id
    after = Sandbox.connect(sandbox_id, resume=False, **opts(server))
    assert after.info.state == "killed"
    after.close()


def test_files_larger_than_one_message_are_streamed(server: LiveServer) -> None:
    data = secrets.token_bytes(12 << 20)  # over the server's 8 MiB per message
    with Sandbox.create(**opts(server)) as sbx:
        assert sbx.files.write("big.bin", data).size == len(data)
        assert sbx.files.read_bytes("big.bin") == data


def test_sync_background_stdin_kill_and_timeout(server: LiveServer) -> None:
    with Sandbox.create(**opts(server)) as sbx:
        handle = sbx.commands.run("read line; echo got $line", background=True)
        assert handle.pid > 0
        handle.send_stdin("ping\n")
        assert handle.wait().stdout == "got ping\n"

        sleeper = sbx.commands.run("sleep 60", background=True, tag="sleeper")
        assert [p.tag for p in sbx.commands.list()] == ["sleeper"]
        killed = sleeper.kill()
        assert killed.reason == "killed" and killed.exit_code == 137

        slow = sbx.commands.run("sleep 10", timeout=0.3)
        assert slow.reason == "timeout" and not slow.ok


def test_sync_lifecycle_connect_and_list(server: LiveServer) -> None:
    tag = secrets.token_hex(4)
    sbx = Sandbox.create(metadata={"suite": tag}, timeout=60, **opts(server))
    try:
        assert sbx.pause().state == "paused"
        with pytest.raises(SandboxNotRunning, match="resume"):
            sbx.commands.run("true")
        again = Sandbox.connect(sbx.sandbox_id, **opts(server))  # resumes it
        assert again.info.state == "running"
        assert again.commands.run("echo back").stdout == "back\n"
        again.close()
        before = sbx.get_info().expires_at
        assert before is not None
        after = sbx.set_timeout(3600).expires_at
        assert after is not None and after > before
        sbx.ping()
        listed = Sandbox.list(metadata={"suite": tag}, **opts(server))
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        assert isinstance(sbx.get_metrics(), list)
    finally:
        sbx.kill()
        sbx.close()
    assert Sandbox.list(metadata={"suite": tag}, **opts(server)) == []


def test_errors_are_corral_errors(server: LiveServer) -> None:
    with pytest.raises(NotFound, match="sb_0123456789abcdef0123"):
        Sandbox.connect("sb_0123456789abcdef0123", **opts(server))
    with pytest.raises(Unauthenticated, match="API key"):
        Sandbox.list(server=server.url, api_key="crl_" + "y" * 32)
    with pytest.raises(TemplateNotFound, match="nope"):
        Sandbox.create("nope", **opts(server))
    with pytest.raises(InvalidRequest, match="isolation"):
        Sandbox.create(isolation="nope", **opts(server))
    with pytest.raises(ServerUnavailable, match="did not answer"):
        Sandbox.list(server=f"http://127.0.0.1:{free_port()}", api_key=server.key)


def test_settings_come_from_the_environment(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_SERVER", server.url)
    monkeypatch.setenv("CORRAL_API_KEY", server.key)
    assert isinstance(Sandbox.list(), list)


# -- async ---------------------------------------------------------------------------------


async def test_async_run_with_async_callbacks(server: LiveServer) -> None:
    seen: list[str] = []

    async def collect(text: str) -> None:
        seen.append(text)

    async with await AsyncSandbox.create(**opts(server)) as sbx:
        result = await sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=collect)
        assert result.stdout == "1\n2\n3\n" and seen == ["1", "2", "3"]
        await sbx.files.write("x.txt", "async")
        assert await sbx.files.read("x.txt") == "async"
        handle = await sbx.commands.run("cat", background=True)
        await handle.send_stdin("through stdin")
        await handle.close_stdin()
        assert (await handle.wait()).stdout == "through stdin"


async def test_a_foreground_command_dies_with_its_client(server: LiveServer) -> None:
    async with await AsyncSandbox.create(**opts(server)) as sbx:
        run = asyncio.create_task(sbx.commands.run("sleep 30", timeout=None, tag="fg"))

        async def started() -> bool:
            return [p.tag for p in await sbx.commands.list()] == ["fg"]

        await until(started, "the command to start")
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

        async def gone() -> bool:
            return await sbx.commands.list() == []

        await until(gone, "the server to end the foreground command")


async def test_a_background_command_outlives_its_client(server: LiveServer) -> None:
    async with await AsyncSandbox.create(**opts(server)) as sbx:
        handle = await sbx.commands.run("sleep 30", background=True, tag="bg")
        await handle.disconnect()
        await asyncio.sleep(0.5)
        processes = await sbx.commands.list()
        assert [(p.pid, p.tag, p.background) for p in processes] == [(handle.pid, "bg", True)]
        await sbx.commands.kill(handle.pid)

        async def gone() -> bool:
            return await sbx.commands.list() == []

        await until(gone, "the command to be gone")
