"""Hostile code: every attempt must be contained and reported, and the host left unharmed."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import CommandError, FileError, FileNotFound, NoSpace, PermissionDenied
from corral.isolation import Engine, Limits, Sandbox
from tests.conftest import isolation_of, require_backend
from tests.kit.polling import until

# Every tier holds against the same attacks (the "second wall" is in addition).
pytestmark = [pytest.mark.sandbox, pytest.mark.hostile, pytest.mark.usefixtures("tier")]


@pytest.fixture
def host_secret() -> Iterator[Path]:
    """A secret on the host, in places sandboxes must never see."""
    token = secrets.token_hex(16)
    path = Path("/root" if os.geteuid() == 0 else Path.home()) / f"corral-secret-{token[:8]}"
    path.write_text(token)
    yield path
    path.unlink()


@pytest.fixture
async def small(
    engine: Engine, settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[Sandbox]:
    """A sandbox with tight limits, for resource attacks, on the test's tier."""
    isolation = isolation_of(request)
    require_backend(settings, isolation)
    limits = Limits(memory_mib=128, pids=64, disk_mib=32, output_bytes=1 << 20)
    template = request.getfixturevalue("tier_template")
    box = await engine.create(template, isolation=isolation, limits=limits)
    yield box
    await box.destroy()


async def python(sandbox: Sandbox, code: str, timeout: float = 30) -> tuple[str, str, str]:
    result = await sandbox.run(["python3", "-c", textwrap.dedent(code)], timeout=timeout)
    return result.stdout.decode(), result.stderr.decode(), result.reason


@pytest.mark.microvm_subset
async def test_host_secrets_are_not_visible(sandbox: Sandbox, host_secret: Path) -> None:
    for path in (str(host_secret), "/etc/shadow", "/root", "/home", "/var/lib", "/etc/ssh"):
        result = await sandbox.run(["cat", path])
        assert result.exit_code != 0, path
        assert host_secret.read_text() not in result.stdout.decode()
    listing = await sandbox.run(["ls", "/etc"])
    assert b"passwd" in listing.stdout
    if sandbox.spec.template == "host":  # a layer template's /etc/shadow is its own
        assert b"shadow" not in listing.stdout
    # Through /proc: pid 1 is the sandbox's own init, whose root is the sandbox's.
    escape = await sandbox.run(["cat", f"/proc/1/root{host_secret}"])
    assert escape.exit_code != 0
    # Not there (a layer template may have a /root of its own: its user may not read it).
    with pytest.raises((FileNotFound, PermissionDenied)):
        await sandbox.read_bytes(str(host_secret))


async def test_planted_symlink_resolves_inside_the_sandbox(
    sandbox: Sandbox, host_secret: Path
) -> None:
    await sandbox.run(["ln", "-s", str(host_secret), "/workspace/link"])
    await sandbox.run(["ln", "-s", "/usr/bin", "/workspace/bin-link"])
    with pytest.raises((FileNotFound, PermissionDenied)):  # a layer template's /root
        await sandbox.read_bytes("/workspace/link")
    with pytest.raises(FileError):
        await sandbox.write_file("/workspace/bin-link/evil", b"#!/bin/sh\n")
    assert not Path("/usr/bin/evil").exists()
    with pytest.raises(FileError):
        await sandbox.write_file("/workspace/link", b"overwritten", append=True)
    assert len(host_secret.read_text()) == 32


async def test_cannot_write_outside_its_storage(sandbox: Sandbox) -> None:
    marker = f"corral-escape-{secrets.token_hex(4)}"
    for target in (f"/usr/{marker}", f"/{marker}", f"/etc/{marker}", f"/proc/{marker}"):
        result = await sandbox.run(["sh", "-c", f"echo x > {target}"])
        assert result.exit_code != 0, target
    assert not Path(f"/usr/{marker}").exists() and not Path(f"/{marker}").exists()
    with pytest.raises((PermissionDenied, FileError)):
        await sandbox.write_file("/usr/bin/python3", b"pwned")
    assert Path("/usr/bin/python3").read_bytes()[:4] == b"\x7fELF"


@pytest.mark.fails_on(
    "microvm",
    reason="the guest's /proc lists its own kernel's threads (about 50): none is the host's",
)
async def test_cannot_see_or_signal_host_processes(sandbox: Sandbox) -> None:
    out, _, _ = await python(
        sandbox,
        """
        import os
        print(len([p for p in os.listdir('/proc') if p.isdigit()]))
        """,
    )
    assert int(out) < 10  # the sandbox's init, the agent, python: not the host's hundreds
    me = os.getpid()
    result = await sandbox.run(["kill", "-9", str(me)])
    assert result.exit_code != 0
    # Every process it can see, its own guest agent included: the agent is the namespace's
    # init, which the kernel protects from signals sent from inside.
    await sandbox.run(["kill", "-9", "-1"])
    await sandbox.run(["python3", "-c", "import os; os.kill(1, 9); os.kill(1, 15)"])
    assert (await sandbox.run(["echo", "still serving"])).stdout == b"still serving\n"


@pytest.mark.microvm_subset
async def test_no_network_to_the_host_loopback(sandbox: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        out, _, _ = await python(
            sandbox,
            f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("connected")
            except OSError as e:
                print("refused", e.errno)
            print(open('/proc/net/dev').read().count(':'))
            """,
        )
        lines = out.split()
        assert lines[0] == "refused"
        assert lines[-1] == "1"  # one interface: lo
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@pytest.mark.fails_on(
    "gvisor", reason="`unshare -r true` succeeds (user namespaces of gVisor's own kernel)"
)
@pytest.mark.fails_on(
    "microvm", reason="`unshare -r true` succeeds (user namespaces of the guest's own kernel)"
)
async def test_mount_ptrace_and_unshare_tricks_fail(sandbox: Sandbox) -> None:
    for argv in (
        ["unshare", "-r", "true"],
        ["unshare", "--user", "--map-root-user", "--mount", "true"],
        ["unshare", "--pid", "--fork", "true"],
        ["mount", "-t", "tmpfs", "none", "/tmp"],
        ["mount", "--bind", "/", "/tmp"],
    ):
        result = await sandbox.run(argv)
        assert result.exit_code != 0, argv
    out, _, _ = await python(
        sandbox,
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        # ptrace(PTRACE_ATTACH, 1): attach to the sandbox's init.
        print(libc.ptrace(16, 1, 0, 0), ctypes.get_errno())
        # keyctl, bpf: refused by the seccomp filter.
        print(libc.syscall(250, 0, 0, 0, 0, 0), ctypes.get_errno())
        print(libc.syscall(321, 0, 0, 0), ctypes.get_errno())
        print(os.getuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])
        """,
    )
    ptrace, keyctl, bpf, ids = out.splitlines()
    assert ptrace == "-1 1" and keyctl == "-1 1" and bpf == "-1 1"
    assert ids == "1000 0000000000000000"  # no capabilities at all


@pytest.mark.fails_on("gvisor", reason="the agent's /proc/1/environ opens (not undumpable)")
async def test_sandbox_code_cannot_tamper_with_its_agent(sandbox: Sandbox) -> None:
    out, _, _ = await python(
        sandbox,
        """
        for path in ("/proc/1/mem", "/proc/1/fd/1", "/proc/1/environ"):
            try:
                open(path, "rb" if "fd" not in path else "wb")
                print("opened", path)
            except OSError as e:
                print("refused", e.errno)
        """,
    )
    assert out.split() == ["refused", "13"] * 3  # EACCES: the agent is not dumpable


@pytest.mark.fails_on("gvisor", reason="usage().pids counts the sentry's host threads (~1000)")
@pytest.mark.fails_on(
    "microvm",
    reason="the bomb's command ends killed, not timeout; usage().pids counts QEMU's threads",
)
async def test_fork_bomb_is_held_by_the_pids_limit(small: Sandbox) -> None:
    # The foreground shell stays (a builtin loop needs no fork) until the timeout.
    result = await small.run(["bash", "-c", ":(){ :|:& };:; while :; do :; done"], timeout=3)
    assert result.reason == "timeout" and not result.ok
    assert small.usage().pids <= 64
    # The agent sweeps the killed process group until it is empty: the sandbox recovers.

    async def alive() -> bytes | None:
        try:
            return (await small.run(["echo", "alive"], timeout=10)).stdout
        except CommandError:  # EAGAIN: the pids limit still full
            return None

    assert await until(alive, "the sandbox to run a command again") == b"alive\n"
    assert os.getloadavg()[0] < 50  # the host is fine


@pytest.mark.fails_on("gvisor", reason="usage().pids counts the sentry's host threads (~1000)")
@pytest.mark.fails_on(
    "microvm", reason="usage().pids counts QEMU's threads, not the guest's processes"
)
async def test_fork_bomb_left_running_stays_contained(small: Sandbox) -> None:
    # The command exits at once; its bomb goes on in the background, as `cmd &` would.
    await small.run(["bash", "-c", ":(){ :|:& };:"])
    # It grows to the limit (slowly on a busy host: the sandbox has a fraction of a CPU)
    # and never past it.
    await until(lambda: small.usage().pids >= 32, "the bomb to grow to 32", timeout=20)
    for _ in range(20):
        assert small.usage().pids <= 64
        await asyncio.sleep(0.05)
    await small.destroy()  # and destroying the sandbox ends it


@pytest.mark.microvm_subset
@pytest.mark.fails_on("gvisor", reason="an OOM ends the whole sandbox, agent included (GuestError)")
@pytest.mark.fails_on(
    "microvm", reason="the guest kernel refuses the allocation (MemoryError): no OOM kill"
)
async def test_memory_hog_is_oom_killed(small: Sandbox) -> None:
    result = await small.run(["python3", "-c", "b = bytearray(1 << 30); print('survived')"])
    assert result.reason == "oom_killed", result
    assert b"survived" not in result.stdout
    assert small.usage().oom_kills >= 1
    after = await small.run(["echo", "alive"])
    assert after.stdout == b"alive\n"


@pytest.mark.fails_on("gvisor", reason="no disk limit: 100 MB written past disk_mib=32")
async def test_filling_the_disk_ends_in_enospc(small: Sandbox) -> None:
    result = await small.run(["sh", "-c", "dd if=/dev/zero of=/workspace/fill bs=1M count=100"])
    assert result.exit_code != 0
    assert b"No space left on device" in result.stderr
    other = await small.run(["sh", "-c", "head -c 1048576 /dev/zero > /tmp/more"])
    assert other.exit_code != 0  # /tmp shares the same bounded storage
    await small.run(["rm", "/workspace/fill"])
    with pytest.raises(NoSpace):
        await small.write_file("big", (b"\0" * (1 << 20) for _ in range(64)))
    assert (await small.run(["ls", "/workspace"])).stdout == b""  # no partial file left


async def test_output_flood_is_capped(small: Sandbox) -> None:
    cmd = await small.exec(["yes", "flood"])
    received = 0
    async for chunk in cmd:
        received += len(chunk.data)
    result = await cmd.wait()
    assert result.reason == "output_limit"
    assert received <= 1 << 20
    assert not result.ok
