"""The kit's guarantees: a spawned process never outlives its test; waits say what failed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.kit import processes
from tests.kit.polling import until, wait_until

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration  # a pytest process of its own
def test_a_failing_test_leaks_no_process_into_the_next(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent(f"""
        from tests.kit import processes

        def test_fails_with_a_follower_running():
            follower = processes.spawn(["sleep", "300"])
            open({str(pids)!r}, "a").write(f"{{follower.pid}}\\n")
            assert False, "a test that fails half-way"

        def test_next():
            open({str(pids)!r}, "a").write("next\\n")
        """)
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_leak.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "1 failed, 1 passed" in done.stdout, done.stdout + done.stderr
    pid, after = pids.read_text().split()
    assert after == "next" and not alive(int(pid))


def test_reaping_stops_only_what_started_since_the_mark() -> None:
    before = processes.spawn(["sleep", "300"])
    try:
        start = processes.mark()
        later = processes.spawn(["sleep", "300"])
        assert processes.reap_since(start) == [["sleep", "300"]]
        assert later.returncode is not None and before.poll() is None
    finally:
        processes.stop(before, timeout=5)


def test_waits_return_the_value_or_say_what_never_happened() -> None:
    assert wait_until(lambda: [1], "a list") == [1]
    with pytest.raises(AssertionError, match=r"timed out after 0.1 s waiting for a miracle"):
        wait_until(lambda: 0, "a miracle", timeout=0.1)


async def test_async_waits_take_plain_and_async_conditions() -> None:
    calls: list[int] = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) == 3

    assert await until(third_time, "the third call", interval=0.01)
    assert await until(lambda: "yes", "a plain value") == "yes"
    with pytest.raises(AssertionError, match=r"the impossible.*last: False"):
        await until(lambda: False, "the impossible", timeout=0.05)
