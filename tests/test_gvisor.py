"""The `gvisor` tier: real runsc sandboxes, skipped with the probe's reason without runsc."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import GuestError
from corral.isolation import Engine, Limits, Sandbox, netns
from corral.isolation.gvisor import GvisorBackend
from tests.conftest import cgroup_dirs, require_backend
from tests.kit import internet as fake
from tests.kit import processes
from tests.kit.internet import Internet
from tests.kit.netdriver import Driver
from tests.kit.polling import until, wait_until

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


async def test_the_guest_sees_its_memory_limit_and_cpus(engine: Engine, settings: Settings) -> None:
    require_backend(settings, "gvisor")
    async with await engine.create(isolation="gvisor", limits=Limits(memory_mib=300, cpu=2)) as box:
        result = await box.run("free -m | awk '/Mem:/ {print $2}'; nproc")
        total, cpus = result.stdout.decode().split()
        assert 280 <= int(total) <= 300, result
        # runsc 2022 never reports fewer than 2 CPUs (`--cpu-num-from-quota`).
        assert int(cpus) == 2


async def test_a_fork_bomb_is_bounded_and_the_sandbox_lives_on(
    engine: Engine, settings: Settings
) -> None:
    require_backend(settings, "gvisor")
    async with await engine.create(
        isolation="gvisor", limits=Limits(memory_mib=512, pids=64)
    ) as box:
        bomb = await box.exec(["sh", "-c", "b() { b | b & }; b"], timeout=5)
        await bomb.wait()
        # The guest held the bomb to its pids limit (RLIMIT_NPROC, kept by gVisor)...
        forked = await box.run(FORK_COUNT, user="root")
        assert int(forked.stdout) <= 64, forked
        # ...and the host's cgroup held the sentry below its own.
        host_limit = GvisorBackend(settings).cgroup_limits(box.spec.limits).pids
        assert host_limit is not None and box.usage().pids <= host_limit
        await box.run(["pkill", "-9", "-u", "user"], user="root")

        async def gone() -> bool:
            return (await box.run(FORK_COUNT, user="root")).stdout == b"0\n"

        await until(gone, "the bomb's processes to exit", timeout=30)
        assert (await box.run(["echo", "alive"])).stdout == b"alive\n"


# How many processes of `user` run now (from /proc: ps needs statx, see below).
FORK_COUNT = [
    "python3",
    "-c",
    """
import os
count = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        count += os.stat("/proc/" + pid).st_uid == 1000
    except OSError:
        pass  # exited meanwhile
print(count)
""",
]


async def test_memory_past_the_limit_ends_the_sandbox_not_the_host(
    engine: Engine, settings: Settings
) -> None:
    # The guest's memory is the sentry's: the host's OOM killer can only kill the whole
    # sandbox (gVisor 2022 keeps no memory limit of its own).
    require_backend(settings, "gvisor")
    async with await engine.create(isolation="gvisor", limits=Limits(memory_mib=200)) as box:
        with pytest.raises(GuestError, match="out of memory"):
            await box.run(["python3", "-c", "x = bytearray(400 << 20)"], timeout=60)
        assert box.oom_kills() >= 1
    async with await engine.create(isolation="gvisor", limits=Limits(memory_mib=200)) as box:
        assert (await box.run(["python3", "-c", "x = bytearray(100 << 20)"])).exit_code == 0


async def test_pause_stops_the_sandbox_and_resume_goes_on(gvisor: Sandbox) -> None:
    busy = await gvisor.exec(["python3", "-c", "while True: pass"])
    await asyncio.sleep(0.5)
    await gvisor.pause()
    frozen_at = gvisor.usage().cpu_seconds
    await asyncio.sleep(0.5)
    assert gvisor.usage().cpu_seconds - frozen_at < 0.01
    await gvisor.resume()
    await asyncio.sleep(0.5)
    assert gvisor.usage().cpu_seconds - frozen_at > 0.1
    await busy.kill()
    assert (await gvisor.run(["echo", "ok"])).stdout == b"ok\n"


async def test_destroy_leaves_nothing(engine: Engine, settings: Settings) -> None:
    require_backend(settings, "gvisor")
    box = await engine.create(isolation="gvisor")
    await box.exec(["sleep", "300"], background=True)
    fp = box.footprint
    # runsc makes the cgroup in the hierarchies Corral does not use too (v1).
    assert cgroup_dirs(box.id) and fp.path.exists()
    await box.destroy()
    assert not fp.path.exists()
    assert not cgroup_dirs(box.id)
    assert not runsc_processes(box.id)


def runsc_processes(sandbox_id: str) -> list[int]:
    """Host processes whose command line names the sandbox (runsc's own name it)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if sandbox_id.encode() in cmdline and state != b"Z":
            found.append(int(entry))
    return found


def test_the_reaper_cleans_up_after_a_killed_owner(settings: Settings) -> None:
    require_backend(settings, "gvisor")
    child = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from corral.config import Settings
        from corral.isolation import Engine
        async def main():
            engine = Engine(Settings(runtime_dir=Path({str(settings.runtime_dir)!r}),
                                     data_dir=Path({str(settings.data_dir)!r}),
                                     cgroup_parent={settings.cgroup_parent!r}))
            box = await engine.create(isolation="gvisor")
            await box.exec(["sleep", "300"], background=True)
            print(box.id, flush=True)
            await asyncio.sleep(300)
        asyncio.run(main())
    """)
    proc = processes.spawn([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    sandbox_id = proc.stdout.readline().strip()
    assert runsc_processes(sandbox_id) and cgroup_dirs(sandbox_id)
    proc.kill()  # SIGKILL: no cleanup code runs in the owner
    proc.wait()
    proc.stdout.close()
    engine = Engine(settings)
    assert engine.reaped >= 1
    assert not (settings.runtime_dir / "sandboxes" / sandbox_id).exists()
    assert not cgroup_dirs(sandbox_id)
    assert wait_until(lambda: not runsc_processes(sandbox_id), "runsc to be gone", timeout=5)


@pytest.fixture(scope="module")
def driver(internet: Internet, settings: Settings) -> Iterator[Driver]:
    """Sandboxes made inside the fake internet (`tests/kit/netdriver.py`)."""
    require_backend(settings, "gvisor")
    if netns.tools_missing():
        pytest.skip(f"sandbox networks need {', '.join(netns.tools_missing())}")
    driver = Driver.in_gateway(internet.netns(fake.GATEWAY), settings)
    yield driver
    driver.close()


_FETCH = """
import socket, sys, urllib.request
for target in sys.argv[1:]:
    try:
        body = urllib.request.urlopen(f"http://{target}/", timeout=5).read().decode().strip()
    except OSError as exc:
        body = type(exc).__name__
    print(target, body)
"""


def fetch_all(driver: Driver, sandbox: str, *targets: str) -> dict[str, str]:
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", _FETCH, *targets])
    assert done["exit_code"] == 0, done
    return dict(line.split(" ", 1) for line in done["stdout"].splitlines())


def test_an_allowlist_holds_in_a_gvisor_sandbox(driver: Driver, internet: Internet) -> None:
    # The sentry's sockets are host sockets in the sandbox's namespace: its rules apply.
    before = len(internet.saw(service="http", address=fake.DENIED_V4))
    sandbox = driver.ok(
        op="create", network="allowlist", allow=["allowed.test:80"], isolation="gvisor"
    )["id"]
    reached = fetch_all(
        driver, sandbox, "allowed.test", fake.DENIED_V4, fake.PRIVATE_V4, fake.METADATA_V4
    )
    assert reached == {
        "allowed.test": "allowed.test",
        fake.DENIED_V4: "URLError",
        fake.PRIVATE_V4: "URLError",
        fake.METADATA_V4: "URLError",
    }
    driver.ok(op="destroy", id=sandbox)
    assert len(internet.saw(service="http", address=fake.DENIED_V4)) == before


def test_internet_reaches_public_hosts_only(driver: Driver) -> None:
    sandbox = driver.ok(op="create", network="internet", isolation="gvisor")["id"]
    reached = fetch_all(driver, sandbox, fake.ALLOWED_V4, fake.DENIED_V4, fake.PRIVATE_V4)
    assert reached == {
        fake.ALLOWED_V4: "allowed.test",
        fake.DENIED_V4: "denied.test",
        fake.PRIVATE_V4: "URLError",
    }
    # Raw and packet sockets, which would bypass the rules, are refused by gVisor.
    code = "import socket\ntry:\n socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
    code += " print('opened')\nexcept OSError as e:\n print(e.errno)"
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", code], user="root")
    assert done["stdout"].strip() != "opened", done
    driver.ok(op="destroy", id=sandbox)
