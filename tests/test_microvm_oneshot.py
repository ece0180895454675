"""One-shot sandboxes on the microvm tier: the guest runs the entrypoint, and its output,
stderr and exit status reach the caller as on the namespace tier (tests/test_oneshot.py
checks them there). Each is a VM boot (seconds under TCG): one here in `make test`, the
rest `slow`."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from corral.config import Settings
from corral.images import Layer, LayerStore
from corral.isolation import Engine
from corral.isolation.backend import Entrypoint, SeedFile
from corral.isolation.microvm import MicrovmBackend
from corral.limits import Limits
from tests.kit.debian import needs_archive

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]
LIMITS = Limits(cpu=1, memory_mib=384, disk_mib=256)
TIERS = ("namespace", "microvm")


@pytest_asyncio.fixture
async def engine_debian(
    settings: Settings, debian_base: tuple[LayerStore, Layer]
) -> AsyncIterator[Engine]:
    caps = MicrovmBackend.probe(settings)
    if not caps.available:
        pytest.skip(f"microvm backend unavailable here: {'; '.join(caps.missing)}")
    store, layer = debian_base
    engine = Engine(settings)
    engine.templates.add("debian", store, [layer.digest])
    try:
        yield engine
    finally:
        await engine.aclose()


async def outcome(engine: Engine, isolation: str, entrypoint: Entrypoint) -> tuple[object, ...]:
    box = await engine.create("debian", isolation=isolation, limits=LIMITS, entrypoint=entrypoint)
    try:
        assert box.entry is not None
        done = await box.entry.collect()
        return done.stdout, done.stderr, done.exit_code, done.signal, done.reason, done.error
    finally:
        await box.destroy()


async def test_a_one_shot_vm_gives_what_the_namespace_tier_gives(engine_debian: Engine) -> None:
    script = (
        "ls -ld /work /work/in /work/in/run.sh | cut -d' ' -f1,3,4; ./run.sh; pwd; "
        "echo to-stderr >&2; test -t 0 || echo stdin-not-a-tty; cat; "
        # Past a pipe's and a port's buffer, and a process left behind (ended with the VM).
        "head -c 200000 /dev/zero | tr '\\0' x; echo; sleep 600 & exit 7"
    )
    entrypoint = Entrypoint(
        ["sh", "-c", script],
        env={"WHO": "one-shot"},
        cwd="/work/in",
        files=[SeedFile("/work/in/run.sh", b"#!/bin/sh\necho $WHO as $(id -un)\n", 0o750)],
    )
    results = {tier: await outcome(engine_debian, tier, entrypoint) for tier in TIERS}
    assert results["microvm"] == results["namespace"]
    stdout, stderr, code = results["microvm"][:3]
    assert isinstance(stdout, bytes)
    assert stdout.splitlines()[:6] == [
        b"drwxr-x--- user user",  # a seed file's parents: its mode, as bubblewrap makes them
        b"drwxr-x--- user user",
        b"-rwxr-x--- user user",
        b"one-shot as user",
        b"/work/in",
        b"stdin-not-a-tty",
    ]
    assert stdout.splitlines()[6] == b"x" * 200000
    assert (stderr, code) == (b"to-stderr\n", 7)


@pytest.mark.slow
async def test_failures_and_limits_are_reported_as_on_namespace(engine_debian: Engine) -> None:
    cases = [
        Entrypoint(["no-such-program"]),
        Entrypoint(["/etc/hostname"]),
        Entrypoint(["sh", "-c", "kill -TERM $$"]),
        Entrypoint(["sleep", "600"], timeout=2),
        Entrypoint(["sh", "-c", "while :; do echo spam; done"], output_limit=10000),
    ]
    for entrypoint in cases:
        on_vm = await outcome(engine_debian, "microvm", entrypoint)
        on_namespace = await outcome(engine_debian, "namespace", entrypoint)
        # The same status, reason and error; what a shell or bubblewrap writes may differ.
        assert on_vm[2:] == on_namespace[2:], entrypoint
        if entrypoint.output_limit:
            assert on_vm[0] == on_namespace[0]


async def signalled(engine: Engine, isolation: str) -> tuple[bytes, int | None]:
    """A one-shot command that reports the signals it gets: USR1 to it, then TERM to its
    group; its output and status."""
    script = (
        "trap 'echo got-usr1' USR1; trap 'echo got-term; exit 3' TERM; echo ready; "
        "while :; do sleep 0.1; done"
    )
    entrypoint = Entrypoint(["sh", "-c", script], timeout=300)
    box = await engine.create("debian", isolation=isolation, limits=LIMITS, entrypoint=entrypoint)
    try:
        command = box.entry
        assert command is not None
        seen = b""
        sent = False
        async for chunk in command:
            # stderr may differ: a shell may report its `sleep` the group's TERM ended.
            seen += chunk.data if chunk.stream == "stdout" else b""
            if b"ready" in seen and not sent:
                await command.signal(signal.SIGUSR1)
                sent = True
            if b"got-usr1" in seen and b"got-term" not in seen:
                await command.signal(signal.SIGTERM, group=True)
        result = await command.wait()
        return seen, result.exit_code
    finally:
        await box.destroy()


async def test_signals_reach_a_one_shot_vms_command_as_on_namespace(
    engine_debian: Engine,
) -> None:
    """A signal to the command, then to its group (on namespace, that one was sent to a
    group the command does not lead, and reached nobody)."""
    results = {tier: await signalled(engine_debian, tier) for tier in TIERS}
    assert results["microvm"] == results["namespace"] == (b"ready\ngot-usr1\ngot-term\n", 3)
