"""The sandbox engine end to end: real bubblewrap sandboxes, real cgroups, no mocks."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import (
    DirectoryNotEmpty,
    FileNotFound,
    InvalidLimits,
    InvalidRequest,
    IsolationUnavailable,
    SandboxNotRunning,
    SandboxStartFailed,
    UnknownBackend,
    UnknownTemplate,
)
from corral.isolation import Engine, Limits, Sandbox
from tests.conftest import (
    TEST_CGROUP_PARENT,
    cgroup_dirs,
    every_tier,
    host_processes_of_uid,
    require_backend,
    slot_ids,
)
from tests.kit import processes

pytestmark = pytest.mark.sandbox


@every_tier
@pytest.mark.microvm_subset
async def test_runs_a_command_as_an_unprivileged_user(sandbox: Sandbox) -> None:
    result = await sandbox.run(["sh", "-c", "id -u; id -un; pwd; hostname; echo $HOME"])
    assert result.ok, result
    uid, user, cwd, host, home = result.stdout.decode().split()
    assert (uid, user, cwd, home) == ("1000", "user", "/workspace", "/home/user")
    assert host.startswith("sb-") and "_" not in host
    usual = await sandbox.run(["sh", "-c", "touch /var/tmp/x && test -s /etc/os-release"])
    assert usual.ok, usual
    assert result.reason == "exited" and result.signal is None


@every_tier
async def test_output_streams_in_order(sandbox: Sandbox) -> None:
    script = "for i in 1 2 3; do echo out$i; sleep 0.05; echo err$i >&2; sleep 0.05; done"
    cmd = await sandbox.exec(["sh", "-c", script])
    chunks = [(c.stream, c.data) async for c in cmd]
    result = await cmd.wait()
    assert result.ok
    expected = []
    for i in (1, 2, 3):
        expected += [("stdout", f"out{i}\n".encode()), ("stderr", f"err{i}\n".encode())]
    assert chunks == expected


@every_tier
@pytest.mark.microvm_subset
async def test_stdin_write_and_close(sandbox: Sandbox) -> None:
    cmd = await sandbox.exec(["sha256sum"], stdin=True)
    payload = os.urandom(1 << 20)
    await cmd.write_stdin(payload)
    await cmd.close_stdin()
    result = await cmd.collect()
    assert result.ok
    assert result.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


@every_tier
async def test_signal_ends_a_command_as_killed(sandbox: Sandbox) -> None:
    cmd = await sandbox.exec(["sleep", "30"])
    await asyncio.sleep(0.1)
    await cmd.signal(signal.SIGTERM)
    result = await cmd.wait()
    assert (result.reason, result.signal, result.exit_code) == ("killed", 15, 143)


@every_tier
async def test_timeout_is_reported_never_as_success(sandbox: Sandbox) -> None:
    result = await sandbox.run(["sleep", "30"], timeout=0.3)
    assert result.reason == "timeout"
    assert result.exit_code != 0 and not result.ok


@every_tier
async def test_command_not_found_exits_127_with_a_message(sandbox: Sandbox) -> None:
    result = await sandbox.run(["no-such-command-xyz"])
    assert result.exit_code == 127
    assert b"no-such-command-xyz" in result.stderr
    shell = await sandbox.run("no-such-command-xyz")
    assert shell.exit_code == 127


@every_tier
async def test_non_utf8_output_passes_untouched(sandbox: Sandbox) -> None:
    result = await sandbox.run(["printf", r"\377\376\000ok"])
    assert result.stdout == b"\xff\xfe\x00ok"


@every_tier
async def test_background_command_outlives_its_request(sandbox: Sandbox) -> None:
    cmd = await sandbox.exec(["sleep", "30"], background=True, tag="daemon")
    await cmd.detach()
    running = await sandbox.processes()
    assert [p.pid for p in running if p.tag == "daemon"] == [cmd.pid]
    again = await sandbox.attach(cmd.pid)
    await again.kill()
    assert (await again.wait()).reason == "killed"


@every_tier
@pytest.mark.microvm_subset
async def test_file_round_trips(sandbox: Sandbox) -> None:
    await sandbox.write_file("empty", b"")
    assert await sandbox.read_bytes("/workspace/empty") == b""
    every_byte = bytes(range(256)) * 4
    await sandbox.write_file("/tmp/binary", every_byte)
    assert await sandbox.read_bytes("/tmp/binary") == every_byte
    check = await sandbox.run(["sha256sum", "/tmp/binary"])
    assert check.stdout.split()[0].decode() == hashlib.sha256(every_byte).hexdigest()


@every_tier
async def test_fifty_megabyte_file_streams_both_ways(sandbox: Sandbox) -> None:
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()

    def blocks() -> Iterator[bytes]:
        for i in range(50):
            chunk = block[i:] + block[:i]
            digest.update(chunk)
            yield chunk

    entry = await sandbox.write_file("big.bin", blocks())
    assert entry.size == 50 << 20
    back = hashlib.sha256()
    async for chunk in sandbox.read_file("big.bin"):
        back.update(chunk)
    assert back.hexdigest() == digest.hexdigest()


@every_tier
async def test_directory_operations(sandbox: Sandbox) -> None:
    assert await sandbox.make_dir("a/b/c")
    await sandbox.write_file("a/b/c/f.txt", b"x")
    names = {e.path for e in await sandbox.list_dir("a", depth=3)}
    assert {"/workspace/a/b", "/workspace/a/b/c", "/workspace/a/b/c/f.txt"} <= names
    with pytest.raises(DirectoryNotEmpty):
        await sandbox.remove("a")
    await sandbox.rename("a/b/c/f.txt", "g.txt")
    assert (await sandbox.stat("g.txt")).size == 1
    await sandbox.remove("a", recursive=True)
    with pytest.raises(FileNotFound):
        await sandbox.stat("a")


async def test_fifty_sandboxes_at_once(engine: Engine, settings: Settings) -> None:
    require_backend(settings, "namespace")
    boxes = await asyncio.gather(
        *(engine.create(isolation="namespace", limits=Limits(memory_mib=64)) for _ in range(50))
    )
    try:
        results = await asyncio.gather(*(b.run(["echo", b.id]) for b in boxes))
        assert [r.stdout.decode().strip() for r in results] == [b.id for b in boxes]
    finally:
        await asyncio.gather(*(b.destroy() for b in boxes))


@every_tier
@pytest.mark.microvm_subset
async def test_pause_really_freezes(sandbox: Sandbox) -> None:
    busy = await sandbox.exec(["sh", "-c", "while :; do :; done"], background=True)
    await asyncio.sleep(0.3)
    await sandbox.pause()
    frozen_at = sandbox.usage().cpu_seconds
    await asyncio.sleep(0.5)
    assert sandbox.usage().cpu_seconds - frozen_at < 0.01
    with pytest.raises(SandboxNotRunning, match="resume"):
        await sandbox.run(["true"])
    await sandbox.resume()
    await asyncio.sleep(0.3)
    assert sandbox.usage().cpu_seconds - frozen_at > 0.1
    await busy.kill()


@every_tier
async def test_usage_reports_cgroup_figures(sandbox: Sandbox) -> None:
    await sandbox.run(["python3", "-c", "x = bytearray(40 << 20); sum(range(3_000_000))"])
    usage = sandbox.usage()
    assert usage.cpu_seconds > 0.05
    assert usage.memory_peak_bytes >= 40 << 20
    assert usage.pids >= 2  # bwrap's init and the agent, at least


@every_tier
async def test_destroy_leaves_nothing(
    engine: Engine, settings: Settings, tier: str, tier_template: str
) -> None:
    box = await engine.create(tier_template, isolation=tier)
    await box.exec(["sleep", "300"], background=True)
    fp = box.footprint
    assert cgroup_dirs(box.id) and fp.path.exists()
    await box.destroy()
    await box.destroy()  # idempotent
    assert not fp.path.exists()
    assert not cgroup_dirs(box.id)
    assert str(fp.path) not in Path("/proc/self/mounts").read_text()
    if fp.uid_slot is not None:
        assert host_processes_of_uid(*slot_ids(settings, fp.uid_slot)) == []


async def test_reaper_cleans_up_after_a_killed_host_process(settings: Settings) -> None:
    require_backend(settings, "namespace")
    child = textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from corral.config import Settings
        from corral.isolation import Engine
        async def main():
            engine = Engine(Settings(runtime_dir=Path({str(settings.runtime_dir)!r}),
                                     cgroup_parent={settings.cgroup_parent!r}))
            box = await engine.create(isolation="namespace")
            await box.exec(["sleep", "300"], background=True)
            print(box.id, box.footprint.uid_slot, flush=True)
            await asyncio.sleep(300)
        asyncio.run(main())
    """)
    proc = processes.spawn([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    sandbox_id, slot = proc.stdout.readline().split()
    proc.kill()  # SIGKILL: no cleanup code runs in the host process
    proc.wait()
    proc.stdout.close()
    engine = Engine(settings)
    assert engine.reaped >= 1
    assert not (settings.runtime_dir / "sandboxes" / sandbox_id).exists()
    assert not cgroup_dirs(sandbox_id)
    if slot != "None":
        assert host_processes_of_uid(*slot_ids(settings, slot)) == []


def test_the_reaper_spares_a_sandbox_another_process_is_creating(settings: Settings) -> None:
    """A directory with no record yet is removed only once it is old: a fresh one may be
    a sandbox that another process has just made and is about to record."""
    root = settings.runtime_dir / "sandboxes"
    fresh, stale = root / f"sb_{secrets.token_hex(10)}", root / f"sb_{secrets.token_hex(10)}"
    for path in (fresh, stale):
        path.mkdir(parents=True)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    Engine(settings)  # reaps at start
    assert fresh.exists() and not stale.exists()
    fresh.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting tmpfs needs root")
def test_the_namespace_probe_holds_while_other_sandboxes_mounts_come_and_go(
    tmp_path: Path,
) -> None:
    """A busy host mounts and unmounts sandboxes' directories all the time; the probe of
    the namespace tier must not mistake that for a host without user namespaces (it bound
    the whole host and failed ~1 time in 70 when a mount under it went meanwhile, and the
    tier was then unusable until restart: seen as a CLI's "no isolation backend works")."""
    from corral.isolation.namespace import _bwrap, _userns_works

    libc = ctypes.CDLL(None, use_errno=True)
    done = threading.Event()

    def churn(worker: int) -> None:  # a sandbox's rw dir: made, mounted, unmounted, removed
        for n in itertools.count():
            if done.is_set():
                return
            rw = tmp_path / f"sb_{worker}_{n}" / "rw"
            rw.mkdir(parents=True)
            assert libc.mount(b"tmpfs", bytes(rw), b"tmpfs", 0, None) == 0, ctypes.get_errno()
            libc.umount2(bytes(rw), 2)  # MNT_DETACH, as Footprint.release
            shutil.rmtree(rw.parent)

    churners = [threading.Thread(target=churn, args=(k,)) for k in range(3)]
    for thread in churners:
        thread.start()
    try:
        failures = [why for _ in range(400) if (why := _userns_works.__wrapped__(_bwrap()))]
    finally:
        done.set()
        for thread in churners:
            thread.join()
    assert failures == []


@every_tier
@pytest.mark.microvm_subset
@pytest.mark.fails_on(
    "microvm", reason="a 96 MiB guest does not boot (EIO writing /etc/passwd, then a panic)"
)
async def test_limits_reach_the_kernel(engine: Engine, tier: str, tier_template: str) -> None:
    limits = Limits(memory_mib=96, pids=40, open_files=256, cpu=0.5, file_size_mib=8)
    async with await engine.create(tier_template, isolation=tier, limits=limits) as box:
        result = await box.run(["bash", "-c", "ulimit -n; ulimit -c; ulimit -f"])
        assert result.stdout.split() == [b"256", b"0", b"8192"]
        too_big = await box.run(["python3", "-c", "open('f', 'wb').write(bytes(9 << 20))"])
        assert too_big.exit_code != 0 and b"File too large" in too_big.stderr  # EFBIG
        memory = Path(f"/sys/fs/cgroup/memory/{TEST_CGROUP_PARENT}/{box.id}")
        if memory.exists():  # cgroup v1 (this project's CI host)
            assert int((memory / "memory.limit_in_bytes").read_text()) == 96 << 20


@every_tier
async def test_environment_is_clean_and_settable(
    engine: Engine, tier: str, tier_template: str
) -> None:
    os.environ["CORRAL_TEST_HOST_SECRET"] = "leak"
    try:
        greeting = {"GREETING": "hi"}
        async with await engine.create(tier_template, isolation=tier, env=greeting) as box:
            result = await box.run(["env"])
            assert b"GREETING=hi" in result.stdout
            assert b"CORRAL_TEST_HOST_SECRET" not in result.stdout
            per_command = await box.run(["sh", "-c", "echo $X"], env={"X": "y"})
            assert per_command.stdout == b"y\n"
    finally:
        del os.environ["CORRAL_TEST_HOST_SECRET"]


async def test_a_sandbox_that_cannot_start_fails_cleanly(settings: Settings) -> None:
    require_backend(settings, "namespace")
    before = _sandbox_dirs(settings)
    async with Engine(settings.with_(guest_python="/bin/true")) as engine:  # never answers
        with pytest.raises(SandboxStartFailed, match="did not start") as failure:
            await engine.create(isolation="namespace")
    sandbox_id = str(failure.value).split()[1]
    assert sandbox_id.startswith("sb_")
    assert _sandbox_dirs(settings) == before
    assert not cgroup_dirs(sandbox_id)


# -- bad input ----------------------------------------------------------------------------


def _sandbox_dirs(settings: Settings) -> list[Path]:
    """Sandboxes' footprints (not what an engine's sandboxes share, `shared_…`)."""
    root = settings.runtime_dir / "sandboxes"
    return [p for p in root.iterdir() if p.name.startswith("sb_")] if root.exists() else []


async def test_unknown_template_is_refused_and_creates_nothing(
    engine: Engine, settings: Settings
) -> None:
    before = _sandbox_dirs(settings)
    with pytest.raises(UnknownTemplate, match="available templates: host"):
        await engine.create(template="nope", isolation="process")
    assert _sandbox_dirs(settings) == before


async def test_unknown_backend_is_refused(engine: Engine) -> None:
    with pytest.raises(UnknownBackend, match="choose one of: auto, namespace, gvisor, process"):
        await engine.create(isolation="firecracker-please")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_mib": -1},
        {"memory_mib": 0},
        {"cpu": 0},
        {"pids": -5},
        {"disk_mib": 10**12},
        {"memory_mib": "lots"},
        {"open_files": 1.5},
        {"cpu": True},
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidLimits, match="limit"):
        Limits(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("memory_mib", "disk_mib", "storage_mib"),
    [(512, 1024, 448), (512, 64, 64), (512, 448, 448), (512, 449, 448), (100, 1024, 50)],
)
def test_storage_stays_under_the_memory_limit(
    memory_mib: int, disk_mib: int, storage_mib: int
) -> None:
    limits = Limits(memory_mib=memory_mib, disk_mib=disk_mib)
    assert limits.storage_bytes == storage_mib * 1024 * 1024


async def test_limits_beyond_the_host_are_refused(engine: Engine) -> None:
    with pytest.raises(InvalidLimits, match="exceeds this host"):
        await engine.create(limits=Limits(memory_mib=1024 * 1024 - 1), isolation="process")
    with pytest.raises(InvalidLimits, match="cores"):
        await engine.create(limits=Limits(cpu=1000), isolation="process")


async def test_bad_environment_and_network_are_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="environment variable name"):
        await engine.create(env={"A=B": "x"}, isolation="process")
    with pytest.raises(InvalidRequest, match="network mode"):
        await engine.create(network="everything", isolation="process")


async def test_process_backend_needs_opting_in(settings: Settings) -> None:
    engine = Engine(settings.with_(allow_process_backend=False))
    with pytest.raises(IsolationUnavailable, match="CORRAL_ALLOW_PROCESS_BACKEND"):
        await engine.create(isolation="process")


async def test_auto_never_picks_process(settings: Settings) -> None:
    engine = Engine(settings)
    try:
        backend = engine.backend("auto")
    except IsolationUnavailable as exc:
        assert "process" not in str(exc).split("(")[0]
    else:
        assert backend.name != "process"


async def test_a_tier_asked_for_by_name_and_as_auto_is_one_backend(settings: Settings) -> None:
    """The name "auto" resolves to a tier another caller may already have asked for by name: both
    get the same backend, so closing the engine releases everything it holds (two
    instances left the first one's spare disks mounted)."""
    engine = Engine(settings)
    try:
        try:
            auto = engine.backend("auto")
        except IsolationUnavailable as exc:
            pytest.skip(f"no backend for auto here: {exc}")
        assert engine.backend(auto.name) is auto
        fresh = Engine(settings)
        try:
            named = fresh.backend(auto.name)
            assert fresh.backend("auto") is named
        finally:
            await fresh.aclose()
    finally:
        await engine.aclose()


async def test_process_backend_runs_commands(engine: Engine) -> None:
    async with await engine.create(isolation="process") as box:
        result = await box.run(["sh", "-c", "echo hi; pwd"])
        lines = result.stdout.decode().split()
        assert lines[0] == "hi" and lines[1].endswith("/workspace")


async def test_a_network_mode_the_tier_cannot_enforce_is_refused_before_anything_starts(
    engine: Engine,
) -> None:
    with pytest.raises(IsolationUnavailable, match="cannot enforce network mode 'internet'"):
        await engine.create(network="internet", isolation="process")
    assert not engine.sandboxes
