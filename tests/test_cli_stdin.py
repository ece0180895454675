"""`corral run` and `corral sandbox exec` pass a piped stdin to the command, as `docker run -i`
and `ssh` do: streamed in chunks, closed at its end; a command that reads none of it ends
the CLI all the same. The SDK's `commands.run(input=...)` does the feeding."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral import AsyncSandbox, Sandbox
from corral.errors import InvalidRequest
from tests.conftest import LiveServer, opts

pytestmark = [pytest.mark.acceptance, pytest.mark.usefixtures("sandbox_host")]


@pytest.fixture
def sandbox_id(server: LiveServer) -> Iterator[str]:
    created = server.corral("sandbox", "create", "--output", "json")
    assert created.returncode == 0, created.stderr
    sandbox_id = json.loads(created.stdout)["sandbox_id"]
    yield sandbox_id
    server.corral("sandbox", "kill", sandbox_id)


def test_run_passes_piped_stdin(server: LiveServer) -> None:
    done = server.corral("run", "--", "cat", input="hello\n")
    assert (done.returncode, done.stdout) == (0, "hello\n"), done.stderr


def test_run_closes_stdin_at_its_end(server: LiveServer) -> None:
    # wc counts only once it reads EOF: an unclosed stdin would hang it.
    done = server.corral("run", "--", "wc", "-l", input="a\nb\nc\n")
    assert (done.returncode, done.stdout.strip()) == (0, "3"), done.stderr


def test_run_streams_ten_mib_intact(server: LiveServer, tmp_path: Path) -> None:
    data = os.urandom(10 * 1024 * 1024)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    with source.open("rb") as stdin:
        done = server.corral("run", "--", "sha256sum", stdin=stdin, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_run_is_not_held_by_a_stdin_it_does_not_read(server: LiveServer) -> None:
    # `yes` never stops writing: the CLI must end with the command, not with its stdin.
    with subprocess.Popen(["yes"], stdout=subprocess.PIPE) as yes:
        try:
            done = server.corral("run", "--", "true", stdin=yes.stdout)
        finally:
            yes.kill()
    assert (done.returncode, done.stderr) == (0, "")


def test_run_is_not_held_by_a_stdin_that_never_ends(server: LiveServer) -> None:
    # A producer that writes nothing and never closes: the read of stdin never returns.
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(read_end, "rb") as stdin:
            done = server.corral("run", "--", "sh", "-c", "echo done; exit 4", stdin=stdin)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stdout, done.stderr) == (4, "done\n", "")


def test_no_stdin_passes_nothing(server: LiveServer) -> None:
    # With --no-stdin the command's stdin is not the piped one (cat gets EOF at once).
    done = server.corral("run", "--no-stdin", "--", "cat", input="not for cat\n")
    assert (done.returncode, done.stdout) == (0, ""), done.stderr


def test_sandbox_exec_passes_piped_stdin(server: LiveServer, sandbox_id: str) -> None:
    done = server.corral("sandbox", "exec", sandbox_id, "--", "cat", input="to exec\n")
    assert (done.returncode, done.stdout) == (0, "to exec\n"), done.stderr
    done = server.corral(
        "sandbox", "exec", "-i", sandbox_id, "--", "sh", "-c", "cat > f", input="kept\n"
    )
    assert done.returncode == 0, done.stderr
    assert server.corral("sandbox", "cat", sandbox_id, "f").stdout == "kept\n"
    done = server.corral("sandbox", "exec", "--no-stdin", sandbox_id, "cat", input="no\n")
    assert (done.returncode, done.stdout) == (0, ""), done.stderr


# -- the SDK's input=, which the CLI uses ----------------------------------------------------


def test_sdk_input_takes_bytes_text_and_chunks(server: LiveServer) -> None:
    with Sandbox.create(**opts(server)) as sbx:
        assert sbx.commands.run("cat", input=b"raw\x00bytes").stdout == "raw\x00bytes"
        assert sbx.commands.run("cat", input="text é").stdout == "text é"
        chunks = iter([b"one ", b"two ", b"three"])
        assert sbx.commands.run(["cat"], input=chunks).stdout == "one two three"
        with pytest.raises(InvalidRequest, match="send_stdin"):
            sbx.commands.run("cat", background=True, input=b"x")


async def test_async_sdk_input_takes_an_async_iterable(server: LiveServer) -> None:
    async def lines() -> AsyncIterator[bytes]:
        for n in range(3):
            yield f"{n}\n".encode()

    async with await AsyncSandbox.create(**opts(server)) as sbx:
        result = await sbx.commands.run("wc -l", input=lines())
        assert (result.exit_code, result.stdout.strip()) == (0, "3")
