"""One-shot sandboxes: one command in place of the guest agent, with the same isolation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import textwrap
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from corral.errors import InvalidRequest, IsolationUnavailable
from corral.isolation import CommandResult, Engine, Entrypoint, Limits, Sandbox, SeedFile
from tests.conftest import cgroup_dirs, host_processes_of_uid, require_backend, slot_ids
from tests.kit import processes
from tests.kit.polling import until

pytestmark = [pytest.mark.sandbox]


@pytest.fixture
async def ns_engine(engine: Engine, settings: Settings) -> AsyncIterator[Engine]:
    """The engine, where this host can run namespace sandboxes."""
    require_backend(settings, "namespace")
    yield engine


async def oneshot(engine: Engine, entrypoint: Entrypoint, **create: Any) -> Sandbox:
    box = await engine.create(isolation="namespace", entrypoint=entrypoint, **create)
    assert box.entry is not None
    return box


async def run_oneshot(
    engine: Engine, argv: Sequence[str], *, limits: Limits | None = None, **entry: Any
) -> CommandResult:
    """Start a one-shot sandbox, collect its command's result, destroy it."""
    box = await oneshot(engine, Entrypoint(argv, **entry), limits=limits)
    try:
        assert box.entry is not None
        return await box.entry.collect()
    finally:
        await box.destroy()


async def first_output(box: Sandbox, lines: int = 1) -> bytes:
    """Stdout of the running command up to its `lines`-th line: proof that it runs."""
    assert box.entry is not None
    seen = b""
    async for chunk in box.entry:
        assert chunk.stream == "stdout", chunk
        seen += chunk.data
        if seen.count(b"\n") >= lines:
            return seen
    raise AssertionError(f"the command ended after {seen!r}")


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, as the host sees them."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            todo += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return found


def launcher_pid(box: Sandbox) -> int:
    assert box._launcher is not None
    return box._launcher.pid


def sandbox_uid(box: Sandbox, settings: Settings) -> tuple[int, int] | None:
    """The host ids the sandbox runs as, when it has its own (as root): (first, count)."""
    slot = box.footprint.uid_slot
    return None if os.geteuid() != 0 or slot is None else slot_ids(settings, slot)


def cgroup_of(pid: int) -> str:
    """The path of `pid`'s cgroup for the pids controller (v1), or its unified one (v2)."""
    lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    for _, controllers, path in lines:
        if "pids" in controllers.split(","):
            return path
    return next(path for hierarchy, controllers, path in lines if hierarchy == "0")


def cgroup_members(box: Sandbox) -> list[int]:
    """Processes in the sandbox's cgroup, in every hierarchy it has one."""
    dirs = cgroup_dirs(box.id)
    assert dirs, f"no cgroup for {box.id}"
    return sorted({int(p) for d in dirs for p in (d / "cgroup.procs").read_text().split()})


# -- the command's output, environment and files -------------------------------------------


async def test_output_and_exit_code_come_through(ns_engine: Engine) -> None:
    result = await run_oneshot(ns_engine, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert (result.exit_code, result.signal, result.reason) == (3, None, "exited")
    assert not result.ok


async def test_stdin_is_empty(ns_engine: Engine) -> None:
    result = await run_oneshot(ns_engine, ["cat"], timeout=30)
    assert result.ok and result.stdout == b""


async def test_env_and_cwd_reach_the_command(ns_engine: Engine) -> None:
    box = await oneshot(
        ns_engine,
        Entrypoint(
            ["sh", "-c", "echo $GREETING $WHO $BASE; pwd; touch made && ls; id -u"],
            env={"GREETING": "hello", "WHO": "from the entrypoint"},
            cwd="/workspace/a/b",
        ),
        env={"WHO": "from the sandbox", "BASE": "kept"},
    )
    try:
        assert box.entry is not None
        result = await box.entry.collect()
    finally:
        await box.destroy()
    assert result.ok, result
    assert result.stdout.decode().splitlines() == [
        "hello from the entrypoint kept",  # the entrypoint's env wins over the sandbox's
        "/workspace/a/b",  # created, and writable by the command
        "made",
        "1000",
    ]


async def test_files_are_placed_with_content_and_mode(ns_engine: Engine) -> None:
    files = [
        SeedFile("/workspace/bin/deep/run.sh", b"#!/bin/sh\necho ran $1\n", 0o755),
        SeedFile("/workspace/secret.txt", b"s3cret", 0o600),
        SeedFile("/workspace/open", b"", 0o777),
        SeedFile("/tmp/main.py", b"import sys\nprint('python', sys.argv[1])\n"),
    ]
    script = (
        "stat -c '%a %u' /workspace/bin/deep/run.sh /workspace/secret.txt /workspace/open "
        "/tmp/main.py; cat /workspace/secret.txt; echo; /workspace/bin/deep/run.sh it; "
        "python3 /tmp/main.py arg"
    )
    result = await run_oneshot(ns_engine, ["sh", "-c", script], files=files)
    assert result.ok, result
    assert result.stdout.decode().splitlines() == [
        "755 1000",
        "600 1000",
        "777 1000",
        "644 1000",  # the default mode
        "s3cret",
        "ran it",
        "python arg",
    ]


async def test_missing_or_unexecutable_program_is_reported_as_a_shell_would(
    ns_engine: Engine,
) -> None:
    missing = await run_oneshot(ns_engine, ["no-such-command-xyz"])
    assert (missing.exit_code, missing.reason) == (127, "exited")
    assert missing.error is not None and "command not found" in missing.error
    assert "no-such-command-xyz" in missing.error
    not_executable = await run_oneshot(ns_engine, ["/etc/passwd"])
    assert (not_executable.exit_code, not_executable.reason) == (126, "exited")
    assert not_executable.error is not None and "/etc/passwd" in not_executable.error


# -- how it ends ---------------------------------------------------------------------------


async def test_death_by_signal_is_reported_as_killed(ns_engine: Engine) -> None:
    result = await run_oneshot(ns_engine, ["sh", "-c", "kill -9 $$"])
    assert (result.reason, result.signal, result.exit_code) == ("killed", 9, 137)


async def test_timeout_ends_the_command(ns_engine: Engine) -> None:
    started = time.monotonic()
    result = await run_oneshot(ns_engine, ["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert result.reason == "timeout" and not result.ok
    assert result.error is not None and "timeout" in result.error


async def test_kill_ends_the_running_command(ns_engine: Engine) -> None:
    box = await oneshot(ns_engine, Entrypoint(["sh", "-c", "echo started; sleep 30"]))
    try:
        assert box.entry is not None
        await first_output(box)
        started = time.monotonic()
        await box.entry.kill()
        result = await box.entry.wait()
        assert time.monotonic() - started < 10
        assert (result.reason, result.signal) == ("killed", 9)
    finally:
        await box.destroy()


async def test_output_past_the_limit_ends_the_command(ns_engine: Engine) -> None:
    result = await run_oneshot(
        ns_engine, ["yes", "flood"], limits=Limits(output_bytes=1 << 20), timeout=60
    )
    assert result.reason == "output_limit", result
    assert len(result.stdout) == 1 << 20  # exactly the limit, no more held on the host
    assert result.error is not None and "output limit" in result.error


async def test_an_entrypoint_may_print_past_the_sandboxs_limit_when_it_says_so(
    ns_engine: Engine,
) -> None:
    result = await run_oneshot(
        ns_engine,
        ["head", "-c", str(3 << 20), "/dev/zero"],
        limits=Limits(output_bytes=1 << 20),
        output_limit=4 << 20,
    )
    assert result.ok and len(result.stdout) == 3 << 20


async def test_destroy_right_after_create_is_prompt(ns_engine: Engine) -> None:
    """Before the launcher has started anything, destroy kills the launcher itself."""
    for _ in range(5):
        box = await oneshot(ns_engine, Entrypoint(["sleep", "30"]))
        started = time.monotonic()
        await box.destroy()
        assert time.monotonic() - started < 1.5
        assert box._launcher is not None and box._launcher.returncode is not None


async def test_running_out_of_memory_is_reported(ns_engine: Engine) -> None:
    result = await run_oneshot(
        ns_engine,
        ["python3", "-c", "b = bytearray(1 << 30); print('survived')"],
        limits=Limits(memory_mib=64),
    )
    assert result.reason == "oom_killed", result
    assert b"survived" not in result.stdout


async def test_daemons_do_not_outlive_the_command(ns_engine: Engine, settings: Settings) -> None:
    box = await oneshot(
        ns_engine, Entrypoint(["sh", "-c", "setsid sh -c 'sleep 300' & echo forked; exit 0"])
    )
    fp, uid = box.footprint, sandbox_uid(box, settings)
    try:
        assert box.entry is not None
        started = time.monotonic()
        result = await box.entry.collect()
        # The daemon held the output pipes too: they closed when the command's end ended it.
        assert time.monotonic() - started < 60
        assert result.ok and result.stdout == b"forked\n"
        # pids.current lags on cgroup v1 (it counts tasks until they are freed): read the
        # members themselves.
        await until(lambda: cgroup_members(box) == [], "an empty cgroup")
        if uid is not None:
            await until(lambda: host_processes_of_uid(*uid) == [], f"no process of uid {uid}")
    finally:
        await box.destroy()
    assert not fp.path.exists()
    if uid is not None:
        assert host_processes_of_uid(*uid) == []


async def test_many_at_once(ns_engine: Engine, settings: Settings) -> None:
    entrypoints = [Entrypoint(["echo", str(i)]) for i in range(20)]
    created = await asyncio.gather(
        *(ns_engine.create(isolation="namespace", entrypoint=e) for e in entrypoints),
        return_exceptions=True,
    )
    boxes = [box for box in created if isinstance(box, Sandbox)]
    try:
        assert len(boxes) == 20, [e for e in created if not isinstance(e, Sandbox)]
        results = await asyncio.gather(*(box.entry.collect() for box in boxes if box.entry))
        assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(20)]
        assert all(r.ok for r in results)
    finally:
        await asyncio.gather(*(box.destroy() for box in boxes))
    left = {p.name for p in (settings.runtime_dir / "sandboxes").iterdir()}
    assert not left & {box.id for box in boxes}


# -- what a one-shot sandbox refuses -------------------------------------------------------


async def test_no_commands_or_files_without_an_agent(ns_engine: Engine) -> None:
    box = await oneshot(ns_engine, Entrypoint(["sh", "-c", "echo started; sleep 30"]))
    try:
        await first_output(box)
        with pytest.raises(InvalidRequest, match="no guest agent"):
            await box.exec(["true"])
        with pytest.raises(InvalidRequest, match="no guest agent"):
            box.read_file("/etc/hostname")
        with pytest.raises(InvalidRequest, match="no guest agent"):
            await box.write_file("/workspace/x", b"x")
    finally:
        await box.destroy()


async def test_process_tier_cannot_start_one_shot_sandboxes(
    engine: Engine, settings: Settings
) -> None:
    root = settings.runtime_dir / "sandboxes"
    before = set(root.iterdir()) if root.exists() else set()
    # FAILED_PRECONDITION on the wire, as every feature a tier lacks.
    with pytest.raises(IsolationUnavailable, match="process tier cannot start one-shot"):
        await engine.create(isolation="process", entrypoint=Entrypoint(["true"]))
    assert (set(root.iterdir()) if root.exists() else set()) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"argv": []}, "needs a command"),
        ({"argv": ["a\0b"]}, "needs a command"),
        ({"argv": ["true"], "cwd": "workspace"}, "absolute path"),
        ({"argv": ["true"], "files": [SeedFile("main.py", b"")]}, "absolute path"),
        ({"argv": ["true"], "timeout": 0}, "timeout must be positive"),
        ({"argv": ["true"], "timeout": -1.5}, "timeout must be positive"),
        ({"argv": ["true"], "env": {"A=B": "x"}}, "environment variable name"),
    ],
)
def test_bad_entrypoints_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        Entrypoint(**kwargs)


# -- what the host sees ------------------------------------------------------------------


def assert_secrets_not_in_argv(box: Sandbox, *tokens: str) -> None:
    tree = process_tree(launcher_pid(box))
    assert len(tree) >= 3, tree  # bubblewrap, the namespace's init, the command at least
    for pid in tree:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for token in tokens:
            assert token.encode() not in argv, (pid, argv)


async def test_host_visible_argv_carries_no_secrets(ns_engine: Engine) -> None:
    secret, other = secrets.token_hex(16), secrets.token_hex(16)
    box = await oneshot(
        ns_engine,
        Entrypoint(["sh", "-c", "echo $TOKEN $OTHER; sleep 30"], env={"TOKEN": secret}),
        env={"OTHER": other},
    )
    try:
        assert await first_output(box) == f"{secret} {other}\n".encode()
        assert_secrets_not_in_argv(box, secret, other)
    finally:
        await box.destroy()
    agent_box = await ns_engine.create(isolation="namespace", env={"TOKEN": secret})
    try:
        assert (await agent_box.run(["sh", "-c", "echo $TOKEN"])).stdout == f"{secret}\n".encode()
        running = await agent_box.exec(["sh", "-c", "echo $TOKEN; sleep 30"])
        assert (await anext(aiter(running))).data == f"{secret}\n".encode()
        assert_secrets_not_in_argv(agent_box, secret)
        await running.kill()
    finally:
        await agent_box.destroy()


async def test_rlimits_and_cgroup_hold_every_process(ns_engine: Engine) -> None:
    box = await oneshot(
        ns_engine,
        Entrypoint(["bash", "-c", "ulimit -n; ulimit -c; ulimit -f; sleep 30"]),
        limits=Limits(open_files=256, file_size_mib=8, pids=40),
    )
    try:
        # bash counts `ulimit -f` in 1024-byte blocks: 8 MiB.
        assert (await first_output(box, lines=3)).split() == [b"256", b"0", b"8192"]

        def names() -> list[str]:
            found = []
            for pid in process_tree(launcher_pid(box)):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    found.append(Path(f"/proc/{pid}/comm").read_text().strip())
            return found

        # bash forks `sleep` after its third line: wait until the walk sees it.
        await until(lambda: "sleep" in names(), "sleep among the processes")
        tree = process_tree(launcher_pid(box))
        for pid in tree:
            assert cgroup_of(pid).split("/")[-1] == box.id, (pid, cgroup_of(pid))
        limits = Path(f"/proc/{launcher_pid(box)}/limits").read_text()
        open_files = next(line for line in limits.splitlines() if line.startswith("Max open"))
        assert open_files.split()[3:5] == ["256", "256"]
    finally:
        await box.destroy()


# -- hostile code ------------------------------------------------------------------------

_PROBE = textwrap.dedent("""
    import ctypes, json, os, subprocess
    libc = ctypes.CDLL(None, use_errno=True)

    def status(pid):
        lines = open(f"/proc/{pid}/status").read().splitlines()
        fields = dict(line.split(":", 1) for line in lines)
        return {k: fields[k].split()[0] for k in ("Uid", "CapEff", "Seccomp", "NoNewPrivs")}

    def write(path):
        try:
            open(path, "w").write("x")
            return "written"
        except OSError as e:
            return e.errno

    keyctl = libc.syscall(250, 0, 0, 0, 0, 0), ctypes.get_errno()
    ptrace = libc.ptrace(16, 1, 0, 0), ctypes.get_errno()
    print(json.dumps({
        "self": status("self"),
        "init": status(1),
        "init_name": open("/proc/1/comm").read().strip(),
        "unshare": subprocess.run(["unshare", "-r", "true"], capture_output=True).returncode,
        "keyctl": keyctl,
        "ptrace": ptrace,
        "interfaces": [line.split(":")[0].strip()
                       for line in open("/proc/net/dev").read().splitlines()[2:]],
        "usr": write("/usr/corral-escape"),
        "etc": write("/etc/corral-escape"),
        "etc_hosts": write("/etc/hosts"),
    }))
""")


@pytest.mark.hostile
async def test_code_is_confined_like_in_an_agent_sandbox(ns_engine: Engine) -> None:
    result = await run_oneshot(
        ns_engine, ["python3", "/tmp/probe.py"], files=[SeedFile("/tmp/probe.py", _PROBE.encode())]
    )
    assert result.ok, result
    found = json.loads(result.stdout)
    confined = {"Uid": "1000", "CapEff": "0000000000000000", "Seccomp": "2", "NoNewPrivs": "1"}
    assert found["self"] == confined
    assert found["init_name"] == "bwrap" and found["init"] == confined  # bubblewrap's init
    assert found["unshare"] != 0
    assert found["keyctl"] == [-1, 1] and found["ptrace"] == [-1, 1]  # EPERM
    assert found["interfaces"] == ["lo"]
    assert found["usr"] in (13, 30) and found["etc"] in (13, 30)  # EACCES or EROFS
    assert found["etc_hosts"] in (13, 30)
    assert not Path("/usr/corral-escape").exists() and not Path("/etc/corral-escape").exists()


@pytest.mark.hostile
async def test_seed_files_cannot_land_on_read_only_paths(
    ns_engine: Engine, settings: Settings
) -> None:
    """The /etc every sandbox of a template shares must not take a seed file."""
    shared = {p: p.read_bytes() for p in (settings.runtime_dir / "etc").rglob("*") if p.is_file()}
    marker = f"corral-escape-{secrets.token_hex(4)}"
    for path in ("/etc/resolv.conf", "/etc/passwd", f"/etc/{marker}", f"/usr/bin/{marker}"):
        result = await run_oneshot(ns_engine, ["true"], files=[SeedFile(path, b"evil\n")])
        assert not result.ok and b"Read-only" in result.stderr, (path, result)
    assert {p: p.read_bytes() for p in shared} == shared
    assert not list((settings.runtime_dir / "etc").rglob(marker))
    assert not Path(f"/usr/bin/{marker}").exists() and not Path(f"/etc/{marker}").exists()


@pytest.mark.hostile
async def test_kill_everything_leaves_the_host_alone(ns_engine: Engine) -> None:
    bystander = processes.spawn(["sleep", "60"])
    try:
        script = f"kill -9 -1; kill -9 {bystander.pid}; kill -9 1; echo still here"
        result = await run_oneshot(ns_engine, ["sh", "-c", script])
        # Had its init (pid 1) died, the whole sandbox would have: the kernel protects it.
        assert result.stdout == b"still here\n", result
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.hostile
async def test_fork_bomb_ends_at_its_timeout(ns_engine: Engine, settings: Settings) -> None:
    box = await oneshot(
        ns_engine,
        Entrypoint(["bash", "-c", ":(){ :|:& };:; while :; do :; done"], timeout=3),
        limits=Limits(pids=64),
    )
    uid = sandbox_uid(box, settings)
    try:
        assert box.entry is not None
        started = time.monotonic()
        collecting = asyncio.ensure_future(box.entry.collect())
        peak = 0
        while not collecting.done():
            peak = max(peak, box.usage().pids)
            await asyncio.sleep(0.05)
        result = collecting.result()
        assert result.reason == "timeout" and not result.ok
        assert time.monotonic() - started < 30
        assert b"fork: retry: Resource temporarily unavailable" in result.stderr  # it hit the cap
        assert peak <= 64
    finally:
        await box.destroy()
    if uid is not None:
        assert host_processes_of_uid(*uid) == []
    assert os.getloadavg()[0] < 50  # the host is fine
