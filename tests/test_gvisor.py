"""The `gvisor` tier: real runsc sandboxes, skipped with the probe's reason without runsc."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from corral.config import Settings
from corral.isolation import Engine, Sandbox
from tests.conftest import require_backend

pytestmark = [pytest.mark.sandbox]


@pytest.fixture
async def gvisor(engine: Engine, settings: Settings) -> AsyncIterator[Sandbox]:
    require_backend(settings, "gvisor")
    box = await engine.create(isolation="gvisor")
    try:
        yield box
    finally:
        await box.destroy()


async def test_commands_run_as_the_sandbox_user_in_its_workspace(gvisor: Sandbox) -> None:
    result = await gvisor.run("id -un; pwd; hostname; echo $HOME")
    assert result.exit_code == 0, result
    assert result.stdout.decode().split() == [
        "user",
        "/workspace",
        gvisor.id.replace("_", "-"),
        "/home/user",
    ]
    root = await gvisor.run(["id", "-u"], user="root")
    assert root.stdout == b"0\n"


async def test_the_kernel_is_gvisors_not_the_hosts(gvisor: Sandbox) -> None:
    # gVisor's sentry reports its own kernel release and has its own dmesg.
    result = await gvisor.run(["dmesg"])
    assert b"gVisor" in result.stdout, result


async def test_files_round_trip(gvisor: Sandbox) -> None:
    await gvisor.write_file("/workspace/a.txt", b"hello")
    assert await gvisor.read_bytes("/workspace/a.txt") == b"hello"
    result = await gvisor.run(["cat", "/workspace/a.txt"])
    assert result.stdout == b"hello"
    entries = await gvisor.list_dir("/workspace")
    assert [e.name for e in entries] == ["a.txt"]


async def test_network_none_has_only_loopback(gvisor: Sandbox) -> None:
    code = "import socket; print(sorted(name for _, name in socket.if_nameindex()))"
    result = await gvisor.run(["python3", "-c", code])
    assert result.stdout.decode().strip() == "['lo']", result
