"""A sandbox's life through the official SDK, sync and async: create, get_info, list,
set_timeout, pause, connect (resume), kill, auto-pause, and one team never reaching
another's sandboxes."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta

import pytest
from conftest import TEMPLATE
from corral_server import CorralServer
from e2b import (
    AsyncSandbox,
    Sandbox,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
)


def _ids(paginator: object) -> list[str]:
    """Every sandbox id of a sync paginator, page after page."""
    ids: list[str] = []
    while paginator.has_next:  # type: ignore[attr-defined]
        ids += [info.sandbox_id for info in paginator.next_items()]  # type: ignore[attr-defined]
    return ids


async def _async_ids(paginator: object) -> list[str]:
    ids: list[str] = []
    while paginator.has_next:  # type: ignore[attr-defined]
        page = await paginator.next_items()  # type: ignore[attr-defined]
        ids += [info.sandbox_id for info in page]
    return ids


@pytest.fixture
def tag() -> str:
    """A metadata value of this test's own, to list only its sandboxes."""
    return "t-" + secrets.token_hex(4)


@pytest.fixture
def other_key(corral: CorralServer) -> str:
    """An E2B-shaped key of a team of its own."""
    team = "other-" + secrets.token_hex(3)
    assert corral.corral("admin", "team", "create", team).returncode == 0
    made = corral.corral("admin", "key", "create", "--team", team, "--e2b")
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().splitlines()[-1]


def test_create_info_timeout_pause_connect_kill(tag: str) -> None:
    sandbox = Sandbox.create(TEMPLATE, timeout=120, metadata={"tag": tag})
    try:
        assert sandbox.is_running()
        info = sandbox.get_info()
        assert info.sandbox_id == sandbox.sandbox_id and info.state == SandboxState.RUNNING
        assert info.metadata == {"tag": tag} and info.template_id == TEMPLATE
        assert info.lifecycle == {"on_timeout": "kill", "auto_resume": False}
        assert (info.end_at - info.started_at) == timedelta(seconds=120)
        # secure=True is the SDK's default: envd calls carry the sandbox's token.
        assert sandbox._envd_access_token

        sandbox.set_timeout(600)
        end = sandbox.get_info().end_at
        assert end > datetime.now(UTC) + timedelta(seconds=590)

        assert sandbox.pause() is True
        assert sandbox.pause() is False  # paused already
        assert not sandbox.is_running()
        assert sandbox.get_info().state == SandboxState.PAUSED
        paused = SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED])
        assert _ids(Sandbox.list(query=paused)) == [sandbox.sandbox_id]

        resumed = Sandbox.connect(sandbox.sandbox_id, timeout=60)
        assert resumed.is_running() and sandbox.is_running()
        assert resumed._envd_access_token == sandbox._envd_access_token
        assert sandbox.get_info().state == SandboxState.RUNNING
    finally:
        assert sandbox.kill() is True
    assert sandbox.kill() is False
    assert not sandbox.is_running()
    with pytest.raises(SandboxNotFoundException):
        sandbox.get_info()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sandbox.sandbox_id)


def test_list_filters_and_pages(tag: str) -> None:
    boxes = [Sandbox.create(TEMPLATE, metadata={"tag": tag, "n": str(n)}) for n in range(3)]
    try:
        ids = [box.sandbox_id for box in boxes]
        mine = SandboxQuery(metadata={"tag": tag})
        assert _ids(Sandbox.list(query=mine, limit=1)) == ids[::-1]  # newest first
        assert _ids(Sandbox.list(query=mine, order="asc")) == ids
        one = SandboxQuery(metadata={"tag": tag, "n": "1"})
        assert _ids(Sandbox.list(query=one)) == [ids[1]]
        after = SandboxQuery(metadata={"tag": tag}, started_after=boxes[1].get_info().started_at)
        assert _ids(Sandbox.list(query=after, order="asc")) == ids[1:]
        boxes[0].kill()
        assert _ids(Sandbox.list(query=mine)) == [ids[2], ids[1]]
    finally:
        for box in boxes:
            box.kill()


def test_auto_pause_at_the_deadline_then_connect(tag: str) -> None:
    sandbox = Sandbox.create(
        TEMPLATE, timeout=2, metadata={"tag": tag}, lifecycle={"on_timeout": "pause"}
    )
    try:
        assert sandbox.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        deadline = time.monotonic() + 30
        while sandbox.get_info().state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "the deadline never paused the sandbox"
            time.sleep(0.2)
        assert not sandbox.is_running()
        sandbox.connect(timeout=60)
        assert sandbox.is_running()
    finally:
        sandbox.kill()


def test_another_team_never_reaches_the_sandbox(other_key: str, tag: str) -> None:
    sandbox = Sandbox.create(TEMPLATE, metadata={"tag": tag})
    try:
        mine = SandboxQuery(metadata={"tag": tag})
        assert _ids(Sandbox.list(query=mine, api_key=other_key)) == []
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sandbox.sandbox_id, api_key=other_key)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.connect(sandbox.sandbox_id, api_key=other_key)
        assert Sandbox.kill(sandbox.sandbox_id, api_key=other_key) is False
        with pytest.raises(SandboxNotFoundException):
            Sandbox.pause(sandbox.sandbox_id, api_key=other_key)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.set_timeout(sandbox.sandbox_id, 1, api_key=other_key)
        assert sandbox.is_running() and sandbox.get_info().state == SandboxState.RUNNING
    finally:
        sandbox.kill()


# -- async ---------------------------------------------------------------------------------


async def test_async_create_info_timeout_pause_connect_kill(tag: str) -> None:
    sandbox = await AsyncSandbox.create(TEMPLATE, timeout=120, metadata={"tag": tag})
    try:
        assert await sandbox.is_running()
        info = await sandbox.get_info()
        assert info.state == SandboxState.RUNNING and info.metadata == {"tag": tag}
        await sandbox.set_timeout(600)
        end = (await sandbox.get_info()).end_at
        assert end > datetime.now(UTC) + timedelta(seconds=590)
        assert await sandbox.pause() is True
        assert await sandbox.pause() is False
        assert not await sandbox.is_running()
        paused = SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED])
        assert await _async_ids(AsyncSandbox.list(query=paused)) == [sandbox.sandbox_id]
        resumed = await AsyncSandbox.connect(sandbox.sandbox_id, timeout=60)
        assert await resumed.is_running()
        assert (await sandbox.get_info()).end_at == (await resumed.get_info()).end_at
    finally:
        assert await sandbox.kill() is True
    assert await sandbox.kill() is False
    assert not await sandbox.is_running()
    with pytest.raises(SandboxNotFoundException):
        await sandbox.get_info()


async def test_async_list_pages_newest_first(tag: str) -> None:
    boxes = [await AsyncSandbox.create(TEMPLATE, metadata={"tag": tag}) for _ in range(2)]
    try:
        mine = SandboxQuery(metadata={"tag": tag})
        ids = await _async_ids(AsyncSandbox.list(query=mine, limit=1))
        assert ids == [boxes[1].sandbox_id, boxes[0].sandbox_id]
    finally:
        for box in boxes:
            await box.kill()


async def test_async_another_team_never_reaches_the_sandbox(other_key: str, tag: str) -> None:
    sandbox = await AsyncSandbox.create(TEMPLATE, metadata={"tag": tag})
    try:
        with pytest.raises(SandboxNotFoundException):
            await AsyncSandbox.get_info(sandbox.sandbox_id, api_key=other_key)
        assert await AsyncSandbox.kill(sandbox.sandbox_id, api_key=other_key) is False
        assert await sandbox.is_running()
    finally:
        await sandbox.kill()
