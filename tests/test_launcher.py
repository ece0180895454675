"""The launcher's start: a cancel at any of its steps leaves no process behind."""

from __future__ import annotations

import asyncio
import os

import pytest

from corral.isolation.launcher import Launcher, children, launch

pytestmark = [pytest.mark.integration]


async def test_a_launch_cancelled_at_any_step_leaves_no_process_running() -> None:
    # A job cancelled while its one-shot sandbox starts cancels `launch` wherever it is
    # awaiting: before its gate opens, or while its pipes are being connected after.
    outcomes = []
    for steps in range(12):
        gate_opening = asyncio.Event()

        async def ready(event: asyncio.Event = gate_opening) -> None:
            event.set()

        before = set(children(os.getpid()))
        start = launch(
            ["sleep", "60"],
            env={"PATH": os.environ["PATH"]},
            cwd=None,
            pass_fds=(),
            cgroup_procs=(),
            open_files=None,
            file_size=None,
            uid=None,
            gid=None,
            ready=ready(),
        )
        task = asyncio.create_task(start)
        await gate_opening.wait()
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        [outcome] = await asyncio.gather(task, return_exceptions=True)
        if isinstance(outcome, Launcher):  # the cancel came after it had started
            outcome.kill_tree()
            await outcome.wait()
            outcome.stdin.close()
            outcomes.append("started")
        else:
            assert isinstance(outcome, asyncio.CancelledError)
            outcomes.append("cancelled")
        assert set(children(os.getpid())) - before == set(), f"left running after {steps} steps"
    # Both cases were met: cancels that landed inside the start, and starts that finished.
    assert outcomes[0] == "cancelled" and outcomes[-1] == "started", outcomes
