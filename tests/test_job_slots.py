"""A worker's slots: a job's slot takes the next job once the job's last command is over,
while its sandbox is still being destroyed (the teardown costs a one-shot sandbox ~10 ms
of a ~60 ms job, and the claim of the next job overlaps it).

With a real in-process worker, real sandboxes and a SQLite store; the sandbox's destroy
is held back by the test to make the overlap visible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from corral.config import Settings
from corral.isolation import Engine
from corral.jobs.queue import JobQueue
from corral.jobs.sandbox import JobSandbox
from corral.jobs.spec import JobSpec
from corral.store import Store
from tests.conftest import require_backend
from tests.kit.polling import until
from tests.test_job_capacity import running_worker, wait_final
from tests.test_job_store import job


async def test_the_next_job_starts_while_the_last_ones_sandbox_is_destroyed(
    own_runtime: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_backend(own_runtime, "namespace")
    held = asyncio.Event()
    let_go = asyncio.Event()
    destroy: Callable[[JobSandbox], Coroutine[Any, Any, None]] = JobSandbox.destroy

    async def held_destroy(self: JobSandbox) -> None:
        held.set()
        await let_go.wait()
        await destroy(self)

    monkeypatch.setattr(JobSandbox, "destroy", held_destroy)
    store = Store.open(own_runtime)
    try:
        team = store.create_team("slots")
        queue = JobQueue(store, own_runtime)
        spec = JobSpec.from_dict({"command": ["true"]})
        first, _, _ = await queue.submit(team, spec)
        second, _, _ = await queue.submit(team, spec)
        async with Engine(own_runtime) as engine:
            async with running_worker(own_runtime, store, engine, concurrency=1):
                await asyncio.wait_for(held.wait(), 60)
                # One slot: the second job runs while the first's sandbox is not yet gone,
                # and the first's end is written only after its sandbox is.
                started = await until(
                    lambda: job(store, second.id).state != "queued", "the second job to start"
                )
                assert started
                assert job(store, first.id).state == "running"
                assert len(engine.sandboxes) >= 1
                let_go.set()
                ended = [await wait_final(store, j.id) for j in (first, second)]
            assert engine.sandboxes == {}
        assert [row.state for row in ended] == ["succeeded", "succeeded"], ended
        # Nothing of the first job was cut short by the second's start.
        assert ended[0].finished_at is not None and ended[1].started_at is not None
        assert ended[1].started_at < ended[0].finished_at
    finally:
        store.close()
