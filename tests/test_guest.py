"""The guest agent and its host client, against the real agent run as a plain subprocess.

No sandbox here: the agent runs on the host with a temporary workdir, exactly as a
sandbox starts it (``python3 -E -s -S agent.py --workdir DIR``), and the tests drive it
through `GuestConnection`, or through raw frames where the protocol itself is the subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import corral.guest
from corral import errors
from corral.guest import AGENT_FILES, GuestConnection, OutputChunk, agent_source_dir, protocol
from tests.kit.processes import proc_number

# Every test runs the real agent as a process (no sandbox): integration, not unit.
pytestmark = pytest.mark.integration

PYTHON = "/usr/bin/python3"
AGENT = str(agent_source_dir() / "agent.py")
MiB = 1 << 20


@dataclass
class RunningAgent:
    process: asyncio.subprocess.Process
    guest: GuestConnection
    workdir: Path


async def spawn_agent(
    workdir: Path, *, wrapper: Sequence[str] = (), **streams: Any
) -> asyncio.subprocess.Process:
    """The agent as a sandbox starts it, run through `wrapper` (a shell that sets a limit,
    say) when given."""
    argv = [PYTHON, "-E", "-s", "-S", AGENT, "--workdir", str(workdir)]
    return await asyncio.create_subprocess_exec(
        *wrapper,
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        **streams,
    )


async def stop_agent(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def connected(process: asyncio.subprocess.Process) -> AsyncIterator[GuestConnection]:
    """A started `GuestConnection` over the agent `process`'s pipes; at the end it is closed
    and the agent stopped."""
    assert process.stdout is not None and process.stdin is not None
    guest = GuestConnection(process.stdout, process.stdin)
    await guest.start()
    try:
        yield guest
    finally:
        await guest.aclose()
        await stop_agent(process)


@contextlib.asynccontextmanager
async def running_agent(workdir: Path) -> AsyncIterator[RunningAgent]:
    process = await spawn_agent(workdir)
    async with connected(process) as guest:
        yield RunningAgent(process, guest, workdir)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[RunningAgent]:
    async with running_agent(tmp_path) as running:
        yield running


@pytest.fixture
def guest(agent: RunningAgent) -> GuestConnection:
    return agent.guest


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def process_is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def rss_kib(pid: int) -> int:
    return proc_number(pid, "status", "VmRSS")


# -- the package --------------------------------------------------------------------------


def test_exports_and_agent_files() -> None:
    public = {name for name in dir(corral.guest) if not name.startswith("_")}
    assert set(corral.guest.__all__) <= public
    assert {"GuestConnection", "GuestProcess", "ExecResult", "OutputChunk"} <= set(
        corral.guest.__all__
    )
    for name in AGENT_FILES:
        assert (agent_source_dir() / name).is_file()


# -- processes ----------------------------------------------------------------------------


async def test_ping(agent: RunningAgent) -> None:
    info = await agent.guest.ping()
    assert info["version"] == protocol.VERSION
    assert info["pid"] == agent.process.pid
    assert info["uid"] == os.getuid()
    assert info["workdir"] == str(agent.workdir)
    assert isinstance(info["user"], str) and info["user"]


async def test_exec_argv_and_shell(guest: GuestConnection) -> None:
    stdout, stderr, result = await (await guest.exec(["echo", "hello", "world"])).collect()
    assert (stdout, stderr) == (b"hello world\n", b"")
    assert result.ok and result.reason == "exited" and result.output_bytes == 12

    stdout, _, result = await (await guest.exec("echo $((1 + 2)); exit 3")).collect()
    assert stdout == b"3\n"
    assert (result.exit_code, result.reason, result.signal, result.ok) == (3, "exited", None, False)


async def test_stdout_and_stderr_arrive_in_order(guest: GuestConnection) -> None:
    script = "; ".join(f"echo out{i}; sleep 0.05; echo err{i} >&2; sleep 0.05" for i in range(3))
    process = await guest.exec(script)
    chunks = [chunk async for chunk in process]
    expected = []
    for i in range(3):
        expected += [OutputChunk("stdout", b"out%d\n" % i), OutputChunk("stderr", b"err%d\n" % i)]
    assert chunks == expected
    assert (await process.wait()).ok


async def test_stdin_round_trip(guest: GuestConnection) -> None:
    cat = await guest.exec(["cat"], stdin=True)
    await cat.write_stdin(b"hello ")
    await cat.write_stdin(b"stdin")
    await cat.close_stdin()
    stdout, _, result = await cat.collect()
    assert stdout == b"hello stdin" and result.ok

    # 1 MiB is four windows: only returned credit lets it through.
    wc = await guest.exec(["wc", "-c"], stdin=True)
    await wc.write_stdin(random.Random(1).randbytes(MiB))
    await wc.close_stdin()
    stdout, _, result = await wc.collect()
    assert stdout.strip() == str(MiB).encode() and result.ok


async def test_stdin_back_pressure(guest: GuestConnection) -> None:
    sleeper = await guest.exec(["sleep", "30"], stdin=True)  # never reads its stdin
    writing = asyncio.create_task(sleeper.write_stdin(bytes(4 * MiB)))
    await asyncio.sleep(0.3)
    assert not writing.done()  # held back by the agent's credit, not buffered somewhere
    await sleeper.kill()
    assert (await sleeper.wait()).reason == "killed"
    with contextlib.suppress(errors.CommandError):  # unless the last credit came before the end
        await asyncio.wait_for(writing, 5)


async def test_stdin_is_dev_null_unless_asked(guest: GuestConnection) -> None:
    stdout, _, result = await (await guest.exec(["cat"])).collect()
    assert stdout == b"" and result.ok


async def test_env_and_cwd(agent: RunningAgent) -> None:
    (agent.workdir / "sub").mkdir()
    process = await agent.guest.exec(
        'echo "$CORRAL_TEST"; pwd', env={"CORRAL_TEST": "a value"}, cwd="sub"
    )
    stdout, _, result = await process.collect()
    assert stdout == f"a value\n{agent.workdir}/sub\n".encode() and result.ok

    stdout, _, _ = await (await agent.guest.exec(["pwd"])).collect()
    assert stdout == f"{agent.workdir}\n".encode()


async def test_missing_cwd_is_a_command_error_naming_it(agent: RunningAgent) -> None:
    with pytest.raises(errors.CommandError, match=f"{agent.workdir}/nowhere does not exist"):
        await agent.guest.exec(["true"], cwd="nowhere")


async def test_only_the_agents_own_user(guest: GuestConnection) -> None:
    me = str((await guest.ping())["user"])
    stdout, _, _ = await (await guest.exec(["id", "-u"], user=me)).collect()
    assert stdout.strip() == str(os.getuid()).encode()
    with pytest.raises(errors.CommandError, match=f"only '{me}' is available"):
        await guest.exec(["true"], user="no-such-user")


async def test_timeout_kills_the_command(guest: GuestConnection) -> None:
    started = time.monotonic()
    result = await (await guest.exec(["sleep", "30"], timeout=0.3)).wait()
    assert time.monotonic() - started < 5
    assert (result.reason, result.signal, result.exit_code) == ("timeout", 9, 137)
    assert not result.ok and result.error


async def test_output_limit_kills_and_truncates(guest: GuestConnection) -> None:
    limit = 100_000
    stdout, stderr, result = await (await guest.exec(["yes"], output_limit=limit)).collect()
    assert len(stdout) + len(stderr) == limit == result.output_bytes
    assert (result.reason, result.signal, result.ok) == ("output_limit", 9, False)


async def test_sigterm_ends_a_command_as_killed(guest: GuestConnection) -> None:
    process = await guest.exec(["sleep", "30"])
    await process.signal(signal.SIGTERM)
    result = await process.wait()
    assert (result.reason, result.signal, result.exit_code, result.ok) == (
        "killed",
        15,
        143,
        False,
    )


async def test_signal_to_an_unknown_process(guest: GuestConnection) -> None:
    with pytest.raises(errors.CommandError, match="not running"):
        await guest.signal(999_999, signal.SIGTERM)


async def test_twenty_concurrent_commands(guest: GuestConnection) -> None:
    async def run(i: int) -> bytes:
        process = await guest.exec(f"sleep 0.2; echo {i}")
        stdout, _, result = await process.collect()
        assert result.ok
        return stdout

    started = time.monotonic()
    outputs = await asyncio.gather(*(run(i) for i in range(20)))
    assert outputs == [b"%d\n" % i for i in range(20)]
    assert time.monotonic() - started < 3  # they ran side by side


async def test_background_command_outlives_detach(guest: GuestConnection) -> None:
    process = await guest.exec(
        "while true; do echo tick; sleep 0.05; done", background=True, tag="ticker"
    )
    try:
        await process.detach()
        await asyncio.sleep(0.3)  # it keeps running; the agent discards its output
        (info,) = [p for p in await guest.processes() if p.pid == process.pid]
        assert info.tag == "ticker" and info.background and info.argv is None
        assert info.cmd is not None and "tick" in info.cmd
        assert 0 < time.time() - info.started_at < 10

        attached = await guest.attach(process.pid)
        chunk = await anext(aiter(attached))
        assert chunk.stream == "stdout" and chunk.data.startswith(b"tick")
        await attached.kill()
        result = await attached.wait()
        assert (result.reason, result.signal) == ("killed", 9)
        assert process.pid not in [p.pid for p in await guest.processes()]
        with pytest.raises(errors.CommandError, match="not running"):
            await guest.attach(process.pid)
    finally:
        kill_group(process.pid)


async def test_closing_a_foreground_command_kills_it(guest: GuestConnection) -> None:
    process = await guest.exec(["sleep", "30"])
    await process.detach()
    for _ in range(100):
        if process_is_gone(process.pid):
            break
        await asyncio.sleep(0.02)
    assert process_is_gone(process.pid)
    with pytest.raises(errors.InvalidRequest, match="detached"):
        await process.wait()


async def test_command_not_found_and_not_executable(agent: RunningAgent) -> None:
    process = await agent.guest.exec(["no-such-command-xyz", "arg"])
    stdout, stderr, result = await process.collect()
    assert process.pid == 0
    assert (result.exit_code, result.reason) == (127, "exited")
    assert result.error == "command not found: no-such-command-xyz"
    assert stderr == b"corral: command not found: no-such-command-xyz\n" and stdout == b""

    (agent.workdir / "data.txt").write_text("not a program")
    result = await (await agent.guest.exec(["./data.txt"])).wait()
    assert (result.exit_code, result.reason, result.ok) == (126, "exited", False)


async def test_non_utf8_output_passes_through(guest: GuestConnection) -> None:
    stdout, _, _ = await (await guest.exec(["printf", "\\377\\376\\000x"])).collect()
    assert stdout == b"\xff\xfe\x00x"


async def test_output_back_pressure_reaches_the_command(agent: RunningAgent) -> None:
    total = 50 * MiB
    await agent.guest.ping()
    agent_rss = rss_kib(agent.process.pid)
    process = await agent.guest.exec(["head", "-c", str(total), "/dev/zero"])
    chunks = aiter(process)
    received = len((await anext(chunks)).data)
    await asyncio.sleep(0.5)  # a consumer that stopped reading
    # The command is blocked on its pipe: it wrote what we took, one window and the pipe.
    assert proc_number(process.pid, "io", "wchar") < received + protocol.WINDOW + 2 * MiB
    peak = 0
    async for chunk in chunks:
        received += len(chunk.data)
        if received % (64 * protocol.CHUNK) < protocol.CHUNK:
            peak = max(peak, rss_kib(agent.process.pid))
            await asyncio.sleep(0.01)  # a slow consumer
    assert received == total
    assert (await process.wait()).ok
    assert peak - agent_rss < 4 * 1024, f"agent RSS grew from {agent_rss} to {peak} KiB"


# -- files --------------------------------------------------------------------------------


async def test_empty_and_binary_files(guest: GuestConnection) -> None:
    entry = await guest.write_file("empty", b"")
    assert (entry.type, entry.size, entry.name) == ("file", 0, "empty")
    assert await guest.read_bytes("empty") == b""

    every_byte = bytes(range(256))
    entry = await guest.write_file("dir/bytes.bin", every_byte, mode=0o600)
    assert (entry.size, entry.mode) == (256, 0o600)
    assert await guest.read_bytes("dir/bytes.bin") == every_byte
    chunks = [c async for c in guest.read_file("dir/bytes.bin", offset=250, length=4)]
    assert b"".join(chunks) == every_byte[250:254]


async def test_write_from_iterables_and_append(guest: GuestConnection) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        yield b"one "
        yield b"two "

    await guest.write_file("log", pieces())
    entry = await guest.write_file("log", [b"three"], append=True)
    assert entry.size == 13
    assert await guest.read_bytes("log") == b"one two three"


async def test_fifty_megabyte_round_trip(agent: RunningAgent) -> None:
    size, piece = 50 * MiB, MiB

    async def content(digest: hashlib._Hash) -> AsyncIterator[bytes]:
        for i in range(size // piece):
            data = random.Random(i).randbytes(piece)
            digest.update(data)
            yield data

    sent = hashlib.sha256()
    entry = await agent.guest.write_file("big.bin", content(sent))
    assert entry.size == size
    received, count = hashlib.sha256(), 0
    async for chunk in agent.guest.read_file("big.bin"):
        assert len(chunk) <= protocol.CHUNK
        received.update(chunk)
        count += len(chunk)
    assert count == size and received.hexdigest() == sent.hexdigest()
    assert not [p for p in agent.workdir.iterdir() if p.name.endswith(".tmp")]


async def test_list_with_depth_does_not_follow_symlinks(agent: RunningAgent) -> None:
    (agent.workdir / "a" / "b" / "c").mkdir(parents=True)
    (agent.workdir / "a" / "b" / "c" / "deep.txt").write_text("x")
    (agent.workdir / "top.txt").write_text("hello")
    (agent.workdir / "link").symlink_to("a")

    top = await agent.guest.list_dir(".")
    assert [(e.name, e.type) for e in top] == [
        ("a", "dir"),
        ("link", "symlink"),
        ("top.txt", "file"),
    ]
    assert top[2].path == str(agent.workdir / "top.txt") and top[2].size == 5
    assert top[1].symlink_target == "a"

    two = {e.path for e in await agent.guest.list_dir(str(agent.workdir), depth=2)}
    assert str(agent.workdir / "a" / "b") in two
    assert str(agent.workdir / "a" / "b" / "c") not in two
    four = {e.path for e in await agent.guest.list_dir(".", depth=4)}
    assert str(agent.workdir / "a" / "b" / "c" / "deep.txt") in four
    assert not [p for p in four if "/link/" in p]


async def test_stat_reports_a_symlink_as_itself(agent: RunningAgent) -> None:
    (agent.workdir / "ln").symlink_to("/nonexistent/target")
    entry = await agent.guest.stat("ln")
    assert (entry.type, entry.symlink_target) == ("symlink", "/nonexistent/target")


async def test_make_dir(agent: RunningAgent) -> None:
    assert await agent.guest.make_dir("x/y/z") is True
    assert (agent.workdir / "x" / "y" / "z").is_dir()
    assert await agent.guest.make_dir("x/y/z") is False
    (agent.workdir / "file").write_text("")
    with pytest.raises(errors.FileExists):
        await agent.guest.make_dir("file")


async def test_remove(agent: RunningAgent, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "keep.txt").write_text("keep")
    (agent.workdir / "d" / "e").mkdir(parents=True)
    (agent.workdir / "d" / "e" / "f.txt").write_text("f")
    (agent.workdir / "d" / "out").symlink_to(outside)

    with pytest.raises(errors.DirectoryNotEmpty, match="recursive=True"):
        await agent.guest.remove("d")
    await agent.guest.remove("d", recursive=True)
    assert not (agent.workdir / "d").exists()
    assert (outside / "keep.txt").read_text() == "keep"

    (agent.workdir / "g").write_text("")
    await agent.guest.remove("g")
    with pytest.raises(errors.FileNotFound):
        await agent.guest.remove("g")


async def test_rename(agent: RunningAgent) -> None:
    (agent.workdir / "old").write_text("content")
    (agent.workdir / "taken").write_text("other")
    entry = await agent.guest.rename("old", "new")
    assert entry is not None and entry.path == str(agent.workdir / "new") and entry.size == 7
    with pytest.raises(errors.FileExists):
        await agent.guest.rename("new", "taken", overwrite=False)
    await agent.guest.rename("new", "taken")
    assert (agent.workdir / "taken").read_text() == "content"


async def test_file_errors(agent: RunningAgent) -> None:
    with pytest.raises(errors.FileNotFound, match=f"{agent.workdir}/missing.txt"):
        await agent.guest.read_bytes("missing.txt")
    with pytest.raises(errors.InvalidRequest, match="NUL"):
        await agent.guest.stat("bad\0name")
    with pytest.raises(errors.IsADirectory):
        await agent.guest.read_bytes(".")
    with pytest.raises(errors.InvalidRequest, match="/dev/full is a device"):  # only regular files
        await agent.guest.write_file("/dev/full", b"x" * 1000, append=True)
    # The agent is still serving.
    assert (await agent.guest.ping())["version"] == protocol.VERSION


# -- the protocol and the agent's life ----------------------------------------------------


async def test_unknown_op(guest: GuestConnection) -> None:
    with pytest.raises(errors.GuestError, match="unknown op 'bogus'"):
        await guest.request("bogus", x=1)


async def read_frame(process: asyncio.subprocess.Process) -> tuple[int, int, bytes]:
    assert process.stdout is not None
    length, kind, channel = protocol.unpack_header(await process.stdout.readexactly(9))
    return kind, channel, await process.stdout.readexactly(length - 5)


async def test_raw_frames_bad_calls_and_a_protocol_error(tmp_path: Path) -> None:
    process = await spawn_agent(tmp_path, stderr=asyncio.subprocess.PIPE)
    assert process.stdin is not None and process.stderr is not None
    try:
        process.stdin.write(protocol.encode_frame(protocol.CALL, 1, b"{not json"))
        process.stdin.write(protocol.encode_frame(protocol.CALL, 2, b'{"op": "stat"}'))
        process.stdin.write(protocol.encode_frame(protocol.CALL, 3, b'{"op": "nope"}'))
        expected = [(1, "invalid_argument"), (2, "invalid_argument"), (3, "unsupported")]
        for channel, error_type in expected:
            kind, number, payload = await read_frame(process)
            reply = protocol.decode_json(payload)
            assert (kind, number, reply["ok"]) == (protocol.REPLY, channel, False)
            assert reply["error"]["type"] == error_type
        # A frame longer than the 1 MiB limit ends the agent, with a message on stderr.
        process.stdin.write(protocol.encode_header(protocol.IN, 4, protocol.MAX_PAYLOAD + 1))
        assert await asyncio.wait_for(process.wait(), 5) == 2
        assert b"protocol error" in await process.stderr.read()
    finally:
        process.stdin.close()
        await stop_agent(process)


async def test_agent_exits_when_stdin_closes(agent: RunningAgent) -> None:
    sleeper = await agent.guest.exec(["sleep", "30"])
    await agent.guest.aclose()
    assert await asyncio.wait_for(agent.process.wait(), 5) == 0
    for _ in range(100):  # its foreground command died with it
        if process_is_gone(sleeper.pid):
            break
        await asyncio.sleep(0.02)
    assert process_is_gone(sleeper.pid)
    with pytest.raises(errors.GuestError):
        await agent.guest.ping()


async def test_pending_calls_fail_when_the_agent_dies(agent: RunningAgent) -> None:
    sleeper = await agent.guest.exec(["sleep", "30"])
    try:
        agent.process.kill()
        with pytest.raises(errors.GuestError, match="the guest agent exited"):
            await sleeper.wait()
        assert agent.guest.closed
        with pytest.raises(errors.GuestError):
            await agent.guest.ping()
    finally:
        kill_group(sleeper.pid)


async def test_a_daemon_holding_the_pipes_does_not_hang_the_command(
    guest: GuestConnection,
) -> None:
    started = time.monotonic()
    process = await guest.exec("sleep 30 & echo started")
    try:
        stdout, _, result = await process.collect()
        elapsed = time.monotonic() - started
        assert stdout == b"started\n" and result.ok
        assert 1.5 < elapsed < 5, f"reply after {elapsed:.2f}s, expected the 2s exit grace"
    finally:
        kill_group(process.pid)


async def test_commands_are_the_oom_killers_first_choice(agent: RunningAgent) -> None:
    own = Path(f"/proc/{agent.process.pid}/oom_score_adj").read_text()
    stdout, _, _ = await (await agent.guest.exec(["cat", "/proc/self/oom_score_adj"])).collect()
    assert stdout == b"1000\n"
    assert Path(f"/proc/{agent.process.pid}/oom_score_adj").read_text() == own


async def test_commands_inherit_no_descriptors(tmp_path: Path) -> None:
    leaked_r, leaked_w = os.pipe()  # as a launcher might leave them, inheritable
    os.set_inheritable(leaked_r, True)
    try:
        process = await spawn_agent(tmp_path, pass_fds=(leaked_r,))
    finally:
        os.close(leaked_r)
        os.close(leaked_w)
    async with connected(process) as guest:
        stdout, _, _ = await (await guest.exec(["ls", "/proc/self/fd"])).collect()
    # stdin, stdout, stderr, and the directory ls is reading
    assert sorted(int(fd) for fd in stdout.split()) == [0, 1, 2, 3]


async def test_a_full_disk_is_no_space_and_leaves_no_temp_file(tmp_path: Path) -> None:
    # RLIMIT_FSIZE is how a sandbox's disk limit reaches the agent: writes fail with EFBIG.
    wrapper = ["/bin/sh", "-c", 'ulimit -f 64 && exec "$@"', "sh"]
    async with connected(await spawn_agent(tmp_path, wrapper=wrapper)) as guest:
        with pytest.raises(errors.NoSpace, match=f"{tmp_path}/big.bin"):
            await guest.write_file("big.bin", b"x" * MiB)
        assert list(tmp_path.iterdir()) == []
        assert (await guest.write_file("small.txt", b"fits")).size == 4


# A fake agent that answers an exec and then ignores its credit, as a hijacked one might.
_FLOODING_AGENT = """
import os, sys
sys.path.insert(0, {source!r})
from corral.guest import protocol
header = os.read(0, protocol.HEADER_SIZE)
length, kind, channel = protocol.unpack_header(header)
os.read(0, length - 5)
os.write(1, protocol.encode_frame(protocol.EVENT, channel, b'{{"pid": 7}}'))
chunk = protocol.encode_frame(protocol.OUT, channel, b"x" * protocol.CHUNK)
try:
    while True:
        os.write(1, chunk)
except OSError:
    pass
"""


async def test_an_agent_ignoring_its_credit_is_cut_off() -> None:
    source = str(Path(__file__).resolve().parents[1] / "src")
    fake = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FLOODING_AGENT.format(source=source),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    # Not `connected`: this agent is killed, never waited for (its unread output would
    # hold asyncio's wait), and first, as Sandbox.destroy does: it would never stop on EOF.
    assert fake.stdout is not None and fake.stdin is not None
    guest = GuestConnection(fake.stdout, fake.stdin)
    await guest.start()
    try:
        process = await guest.exec(["yes"])
        await asyncio.sleep(0.5)  # the caller reads nothing meanwhile
        with pytest.raises(errors.GuestError, match="beyond its credit"):
            await process.wait()
        assert guest.closed
    finally:
        fake.kill()
        await guest.aclose()
        await fake.wait()


async def test_output_cut_by_the_limit_is_reported_even_after_exit(guest: GuestConnection) -> None:
    for _ in range(20):
        process = await guest.exec(["echo", "truncated"], output_limit=5)
        stdout, _, result = await process.collect()
        assert stdout == b"trunc"
        assert result.reason == "output_limit" and not result.ok
