"""The `gvisor` tier: real runsc sandboxes, skipped with the probe's reason without runsc."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import GuestError, PortClosed
from corral.images import Layer, LayerStore
from corral.isolation import Engine, Limits, Sandbox, netns
from corral.isolation.guest_view import BOOT_ID
from corral.isolation.gvisor import GvisorBackend, _platform_runs, runsc_path
from corral.isolation.volumes import VolumeMount, create_image, in_use
from tests.conftest import cgroup_dirs, require_backend
from tests.kit import internet as fake
from tests.kit import processes
from tests.kit import rootless as rootless_kit
from tests.kit.debian import needs_archive
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
    # Running again: it burns CPU (waited for, not timed: the host may be busy).
    await until(lambda: gvisor.usage().cpu_seconds - frozen_at > 0.1, "CPU use after resume")
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


_OWNERS = """
import os, sys
for path in sys.argv[1:]:
    st = os.stat(path)
    print(path, st.st_uid, st.st_gid)
"""


@pytest.mark.parametrize("_archive", [pytest.param(None, marks=needs_archive("python3"))])
async def test_a_layer_template_keeps_its_owners_and_users(
    engine_debian: Engine, settings: Settings, _archive: None
) -> None:
    require_backend(settings, "gvisor")
    async with await engine_debian.create(template="debian", isolation="gvisor") as box:
        who = await box.run("id -un; id -u; pwd; echo $HOME")
        assert who.stdout.decode().split() == ["user", "1000", "/workspace", "/home/user"], who
        owners = await box.run(
            ["python3", "-c", _OWNERS, "/", "/etc/passwd", "/usr/bin/python3", "/home/user"]
        )
        assert owners.stdout.decode().splitlines() == [
            "/ 0 0",
            "/etc/passwd 0 0",
            "/usr/bin/python3 0 0",
            "/home/user 1000 1000",
        ], owners
        # The root is writable for the sandbox's root (to its disk), not for its user.
        denied = await box.run(["touch", "/usr/bin/mine"])
        assert denied.exit_code != 0
        made = await box.run(
            ["sh", "-c", "echo hi > /usr/bin/mine && cat /usr/bin/mine"], user="root"
        )
        assert made.stdout == b"hi\n", made
        assert (await box.run(["id", "-u"], user="root")).stdout == b"0\n"
    async with await engine_debian.create(template="debian-root", isolation="gvisor") as box:
        assert (await box.run(["id", "-un"])).stdout == b"root\n"
        # Each sandbox has its own disk: the other one's write is not here.
        assert (await box.run(["test", "-e", "/usr/bin/mine"])).exit_code == 1


@pytest.fixture
def volume(settings: Settings, tmp_path: Path) -> Iterator[Path]:
    require_backend(settings, "gvisor")
    path = settings.data_dir / "volumes" / "test" / f"{tmp_path.name[-40:]}.img"
    create_image(path, 64 << 20)
    yield path
    path.unlink(missing_ok=True)


async def test_a_volume_is_shared_with_other_tiers_and_read_only_when_asked(
    engine: Engine, settings: Settings, volume: Path
) -> None:
    mount = VolumeMount("v", volume, "/data")
    async with await engine.create(isolation="gvisor", volumes=[mount]) as box:
        ran = await box.run(["sh", "-c", "mkdir /data/d && echo hello > /data/d/f"])
        assert ran.exit_code == 0, ran
    # The same owners as a namespace sandbox's: the user owns what it wrote.
    require_backend(settings, "namespace")
    async with await engine.create(isolation="namespace", volumes=[mount]) as box:
        ran = await box.run(["sh", "-c", "cat /data/d/f && stat -c %u /data/d/f"])
        assert ran.stdout.decode().split() == ["hello", "1000"], ran
    read_only = VolumeMount("v", volume, "/data", read_only=True)
    async with await engine.create(isolation="gvisor", volumes=[read_only]) as box:
        assert (await box.run(["cat", "/data/d/f"])).stdout == b"hello\n"
        refused = await box.run(["sh", "-c", "echo x > /data/d/f"], user="root")
        assert refused.exit_code != 0
    assert not in_use(volume)


@pytest.fixture
def host_secret() -> Iterator[Path]:
    """A secret on the host, where no sandbox may see it."""
    token = secrets.token_hex(16)
    path = Path("/root" if os.geteuid() == 0 else Path.home()) / f"corral-secret-{token[:8]}"
    path.write_text(token)
    yield path
    path.unlink()


_HOST_VIEW = """
import os, sys
secret = sys.argv[1]
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print("processes", len(pids))
for path in (secret, f"/proc/1/root{secret}", "/root", "/var/lib", "/etc/shadow"):
    try:
        open(path).read() if not os.path.isdir(path) else os.listdir(path)
        print(path, "readable")
    except OSError as e:
        print(path, type(e).__name__)
"""


async def test_the_guest_sees_no_host_process_or_file(gvisor: Sandbox, host_secret: Path) -> None:
    await gvisor.exec(["sleep", "60"], background=True)
    for user in (None, "root"):
        seen = await gvisor.run(["python3", "-c", _HOST_VIEW, str(host_secret)], user=user)
        lines = seen.stdout.decode().splitlines()
        # Only the sandbox's own: the agent (pid 1), the sleep, this python.
        count = int(lines[0].split()[1])
        assert count <= 4, lines
        assert all(line.endswith("Error") for line in lines[1:]), lines
        assert host_secret.read_text() not in seen.stdout.decode()
    # The kernel the guest talks to is gVisor's: the host's symbols and keys are not there.
    kallsyms = await gvisor.run(["sh", "-c", "cat /proc/kallsyms /proc/keys | head -c 100"])
    assert kallsyms.stdout == b""


async def test_hostile_writes_to_the_read_only_tree_fail_even_as_root(gvisor: Sandbox) -> None:
    for path in ("/usr/bin/python3", "/etc/passwd", "/.corral/agent.py", "/usr/new"):
        done = await gvisor.run(["sh", "-c", f"echo pwned >> {path}"], user="root")
        assert done.exit_code != 0, (path, done)
    remount = await gvisor.run(["mount", "-o", "remount,rw", "/usr"], user="root")
    assert remount.exit_code != 0
    assert b"pwned" not in Path("/usr/bin/python3").read_bytes()[-64:]
    # The agent's own files are out of reach: the sandbox's writes go to its tmpfs only.
    assert (await gvisor.run(["touch", "/workspace/ok"])).exit_code == 0


_ROOTLESS = """
import asyncio
from pathlib import Path
from corral.config import Settings
from corral.errors import IsolationUnavailable
from corral.isolation import Engine
from corral.isolation.registry import backend_class

async def main():
    settings = Settings(**{k: (Path(v) if k.endswith("_dir") else v) for k, v in %r.items()})
    caps = backend_class("gvisor").probe(settings)
    if not caps.available:
        print("unavailable", "; ".join(caps.missing))
        return
    async with Engine(settings) as engine:
        async with await engine.create(isolation="gvisor") as box:
            print((await box.run("id -un; id -u", user="root")).stdout.decode().split())
            print((await box.run("id -un; pwd")).stdout.decode().split())
        try:
            await engine.create(isolation="gvisor", network="internet")
        except IsolationUnavailable as exc:
            print("refused", exc)
    print(sorted(p.name for p in (settings.runtime_dir / "sandboxes").iterdir()))

asyncio.run(main())
"""


def test_without_root_runsc_runs_rootless_with_network_none(settings: Settings) -> None:
    require_backend(settings, "gvisor")
    if missing := rootless_kit.missing():
        pytest.skip(f"running an engine without root needs {', '.join(missing)}")
    with (
        rootless_kit.home() as home,
        rootless_kit.delegated_cgroup(settings.cgroup_parent) as cgroup_parent,
    ):
        fields = {
            "runtime_dir": str(home / "run"),
            "data_dir": str(home / "data"),
            "cgroup_parent": cgroup_parent,
        }
        done = subprocess.run(
            ["setpriv", f"--reuid={rootless_kit.NOBODY}", f"--regid={rootless_kit.NOBODY}",
             "--clear-groups", "--", sys.executable, "-c", _ROOTLESS % (fields,)],
            capture_output=True, text=True, timeout=120, cwd="/",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "['root', '0']", lines
    assert lines[1] == "['user', '/workspace']", lines
    assert lines[2].startswith("refused the gvisor tier cannot enforce network mode 'internet'")
    assert lines[3] == "[]"  # nothing left


async def test_each_sandbox_has_a_boot_id_of_its_own(engine: Engine, settings: Settings) -> None:
    require_backend(settings, "gvisor")
    ids = []
    for _ in range(2):
        async with await engine.create(isolation="gvisor") as box:
            ids.append((await box.read_bytes(BOOT_ID)).strip())
    host = Path(BOOT_ID).read_bytes().strip()
    assert len(set(ids)) == 2 and host not in ids and all(len(i) == 36 for i in ids), ids


async def test_open_files_and_file_size_limits_hold_in_the_guest(
    engine: Engine, settings: Settings
) -> None:
    require_backend(settings, "gvisor")
    limits = Limits(file_size_mib=1, open_files=100)
    async with await engine.create(isolation="gvisor", limits=limits) as box:
        write = "head -c 2000000 /dev/zero > /tmp/big; wc -c < /tmp/big; ulimit -n"
        done = await box.run(["sh", "-c", write])
        assert done.stdout.split() == [b"1048576", b"100"], done
        assert b"File size limit exceeded" in done.stderr


@pytest.mark.parametrize("_archive", [pytest.param(None, marks=needs_archive("python3"))])
async def test_a_snapshot_of_a_gvisor_sandbox_starts_a_namespace_one(
    engine_debian: Engine, settings: Settings, debian_base: tuple[LayerStore, Layer], _archive: None
) -> None:
    require_backend(settings, "gvisor")
    store, _ = debian_base
    async with await engine_debian.create(template="debian", isolation="gvisor") as box:
        made = "echo made > /etc/made && echo mine > /home/user/mine"
        assert (await box.run(["sh", "-c", made], user="root")).exit_code == 0
        await box.run(["sh", "-c", "echo theirs > /workspace/theirs"])
        digests = await box.snapshot(store)
    engine_debian.templates.add("gvisor-snap", store, digests)
    async with await engine_debian.create(template="gvisor-snap", isolation="namespace") as box:
        seen = await box.run(["sh", "-c", "cat /etc/made; stat -c %U /etc/made /workspace/theirs"])
        assert seen.stdout.decode().split() == ["made", "root", "user"], seen


async def test_the_host_reaches_a_port_of_a_sandbox_without_network(gvisor: Sandbox) -> None:
    server = (
        "import http.server as h; h.HTTPServer(('127.0.0.1', 8000), h.SimpleHTTPRequestHandler)"
    )
    await gvisor.exec(["python3", "-c", server + ".serve_forever()"], background=True)

    async def fetched() -> bytes | None:
        try:
            sock = await gvisor.open_port(8000)
        except PortClosed:
            return None
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer

    answer = await until(fetched, "the server in the sandbox to answer")
    assert answer.startswith(b"HTTP/1.0 200 OK"), answer


@pytest.mark.parametrize("platform", ["ptrace", "kvm"])
def test_a_platform_probe_leaves_nothing_in_the_temp_dir(
    platform: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kvm trial is killed when it hangs (here): `runsc do` left its bundle dir in
    $TMPDIR each time, 750 of them in /tmp after a day of tests."""
    runsc = runsc_path()
    if runsc is None:
        pytest.skip("runsc is not installed")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    _platform_runs.__wrapped__(runsc, platform)
    assert list(tmp_path.iterdir()) == []
