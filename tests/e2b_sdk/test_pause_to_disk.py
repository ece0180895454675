"""E2B's filesystem-only pause through the official SDK, sync and async:
`pause(keep_memory=False)` and `lifecycle={"on_timeout": {"action": "pause",
"keep_memory": False}}`. The sandbox's files survive, its processes do not, and connect
cold-boots it (a new kernel boot id); a sandbox paused so is kept past its deadline."""

from __future__ import annotations

import asyncio
import time

from conftest import TEMPLATE
from e2b import AsyncSandbox, Sandbox, SandboxState

BOOT_ID = "/proc/sys/kernel/random/boot_id"
MARKER = "/home/user/marker.txt"


def test_pause_without_memory_keeps_files_and_reboots() -> None:
    sandbox = Sandbox.create(TEMPLATE, timeout=120)
    try:
        sandbox.files.write(MARKER, "persisted")
        boot = sandbox.files.read(BOOT_ID)
        sandbox.commands.run("sleep 600", background=True)
        assert sandbox.pause(keep_memory=False)
        assert not sandbox.is_running()
        assert sandbox.get_info().state == SandboxState.PAUSED
        sandbox.set_timeout(1)  # its deadline passes while it is paused: it stays
        time.sleep(3)
        assert sandbox.get_info().state == SandboxState.PAUSED
        resumed = sandbox.connect(timeout=120)
        assert resumed.sandbox_id == sandbox.sandbox_id and resumed.is_running()
        assert resumed.files.read(MARKER) == "persisted"
        assert resumed.files.read(BOOT_ID) != boot
        assert [p for p in resumed.commands.list() if "sleep" in p.cmd] == []
    finally:
        sandbox.kill()


def test_auto_pause_without_memory_reboots_on_connect() -> None:
    sandbox = Sandbox.create(
        TEMPLATE, timeout=2, lifecycle={"on_timeout": {"action": "pause", "keep_memory": False}}
    )
    try:
        sandbox.files.write(MARKER, "auto")
        boot = sandbox.files.read(BOOT_ID)
        deadline = time.monotonic() + 30
        while sandbox.get_info().state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "the deadline never paused the sandbox"
            time.sleep(0.2)
        resumed = sandbox.connect(timeout=120)
        assert resumed.files.read(MARKER) == "auto"
        assert resumed.files.read(BOOT_ID) != boot
    finally:
        sandbox.kill()


async def test_async_pause_without_memory_keeps_files_and_reboots() -> None:
    sandbox = await AsyncSandbox.create(TEMPLATE, timeout=120)
    try:
        await sandbox.files.write(MARKER, "persisted")
        boot = await sandbox.files.read(BOOT_ID)
        assert await sandbox.pause(keep_memory=False)
        assert not await sandbox.is_running()
        resumed = await sandbox.connect(timeout=120)
        assert await resumed.is_running()
        assert await resumed.files.read(MARKER) == "persisted"
        assert await resumed.files.read(BOOT_ID) != boot
    finally:
        await sandbox.kill()


async def test_async_auto_pause_without_memory_reboots_on_connect() -> None:
    sandbox = await AsyncSandbox.create(
        TEMPLATE, timeout=2, lifecycle={"on_timeout": {"action": "pause", "keep_memory": False}}
    )
    try:
        await sandbox.files.write(MARKER, "auto")
        boot = await sandbox.files.read(BOOT_ID)
        deadline = time.monotonic() + 30
        while (await sandbox.get_info()).state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "the deadline never paused the sandbox"
            await asyncio.sleep(0.2)
        resumed = await sandbox.connect(timeout=120)
        assert await resumed.files.read(MARKER) == "auto"
        assert await resumed.files.read(BOOT_ID) != boot
    finally:
        await sandbox.kill()
