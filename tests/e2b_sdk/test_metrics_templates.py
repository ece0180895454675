"""The official SDK's metrics, template aliases, builds and network options against
Corral: metrics appear within seconds and none come from before the sandbox; `base`
exists as an alias; `Template().from_template("base")` with RUN and COPY steps builds a
template sandboxes start from; internet access turned off makes the SDK's create ask
for `none` (the server's own cap keeps the session's sandboxes off any uplink)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import SANDBOX_TIMEOUT, TEMPLATE
from e2b import AsyncSandbox, AsyncTemplate, Sandbox, Template


def test_metrics_come_within_seconds_and_none_before_the_sandbox(sandbox: Sandbox) -> None:
    started = datetime.now(UTC) - timedelta(seconds=2)
    metrics = []
    for _ in range(60):
        metrics = sandbox.get_metrics()
        if metrics:
            break
        time.sleep(0.5)
    assert metrics, "no metrics within 30 s"
    point = metrics[0]
    assert point.cpu_count >= 1 and point.mem_total > 0 and point.disk_total > 0
    assert point.mem_used > 0 and point.cpu_used_pct >= 0
    ranged = sandbox.get_metrics(start=started, end=datetime.now(UTC))
    assert ranged and all(m.timestamp.timestamp() >= started.timestamp() - 10 for m in ranged)
    before = sandbox.get_metrics(
        start=started - timedelta(hours=1), end=started - timedelta(minutes=30)
    )
    assert before == []


def test_the_base_alias_exists_and_an_unknown_one_does_not() -> None:
    assert Template.exists(TEMPLATE) is True
    assert Template.exists(f"no-such-{uuid.uuid4().hex[:8]}") is False


def test_a_template_built_from_base_with_run_and_copy(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("copied by the builder\n")
    name = f"built-{uuid.uuid4().hex[:10]}"
    template = (
        Template(file_context_path=str(tmp_path))
        .from_template(TEMPLATE)
        .run_cmd("echo built > /tmp/built.txt")
        .copy("hello.txt", "/tmp/hello.txt")
    )
    logs: list[str] = []
    Template.build(template, name, on_build_logs=lambda entry: logs.append(entry.message))
    box = Sandbox.create(name, timeout=SANDBOX_TIMEOUT)
    try:
        done = box.commands.run("cat /tmp/built.txt /tmp/hello.txt")
        assert done.stdout == "built\ncopied by the builder\n"
    finally:
        box.kill()
    assert any("Uploaded" in line for line in logs), logs


async def test_async_metrics_and_alias(async_sandbox: AsyncSandbox) -> None:
    metrics = []
    for _ in range(60):
        metrics = await async_sandbox.get_metrics()
        if metrics:
            break
        await asyncio.sleep(0.5)
    assert metrics
    assert await AsyncTemplate.exists(TEMPLATE) is True


def test_internet_access_off_is_a_sandbox_without_network() -> None:
    box = Sandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT, allow_internet_access=False)
    try:
        # No address but loopback: nothing to reach, whatever the host has.
        done = box.commands.run("cat /proc/net/route | wc -l")
        assert done.stdout.strip() == "1"  # the header line only: no route at all
    finally:
        box.kill()
