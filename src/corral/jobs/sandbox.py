"""The sandbox a job runs in, and where a worker's jobs get theirs.

A job's sandbox is one of two kinds, and only this module asks which:

- warm (or new) with a guest agent: the job's files are written into it and each step
  is started through the agent;
- one-shot: the sandbox starts *as* the job's one command (`Entrypoint`), its files
  seeded at the start; that command is the job's only step. It costs a third less to
  start, and a tier offers it when it can (`Backend.entrypoints`).

`JobSandboxes` is a worker's source of them: a warm one from its pool when one is ready
and fits, else one-shot when the job allows it and the tier can, else a new one. It also
keeps the memory of jobs claimed but not yet given a sandbox, which the next claim must
not hand out again.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence

from corral.errors import CorralError
from corral.isolation import Command, Engine, Entrypoint, Limits, Sandbox
from corral.isolation.volumes import VolumeMount
from corral.jobs.queue import never_fits
from corral.jobs.spec import LANGUAGES, JobFile, Step
from corral.network.policy import NetworkPolicy
from corral.sandboxes.pool import WarmPool

log = logging.getLogger("corral.jobs")


def source_path(index: int, step: Step) -> str:
    """Where a code step's source is put in the sandbox ("" for other steps)."""
    if not step.workload.code:
        return ""
    return f"/tmp/.corral-job/step-{index}{LANGUAGES[step.workload.language][1]}"


class JobSandbox:
    """The sandbox of one attempt: files go in and steps start the same way whichever
    kind it is."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox

    async def place_files(self, workdir: str, files: Sequence[JobFile], make_workdir: bool) -> None:
        """Write the job's files under `workdir` (a one-shot sandbox has them already)."""
        if self.sandbox.entry is not None:
            return
        if make_workdir:
            await self.sandbox.make_dir(workdir)
        for f in files:
            await self.sandbox.write_file(posixpath.join(workdir, f.path), f.content, mode=f.mode)

    async def start(
        self,
        index: int,
        step: Step,
        *,
        env: dict[str, str],
        cwd: str,
        timeout: float,
        output_limit: int,
    ) -> Command:
        """Step `index` running: in a one-shot sandbox, the command it started as (with
        the job's timeout); else started now through the agent."""
        if self.sandbox.entry is not None:
            return self.sandbox.entry
        source = source_path(index, step)
        if source:
            await self.sandbox.write_file(source, step.workload.code.encode(), mode=0o600)
        return await self.sandbox.exec(
            step.workload.argv(source),
            env=env,
            cwd=cwd,
            timeout=timeout,
            output_limit=output_limit,
        )

    async def destroy(self) -> None:
        """Kill every process the job started and free the sandbox."""
        await self.sandbox.destroy()


class JobSandboxes:
    """A worker's source of job sandboxes, with the memory its claimed jobs will take."""

    def __init__(self, engine: Engine, pool: WarmPool) -> None:
        self.engine = engine
        self.pool = pool
        # Memory of the jobs claimed whose sandbox is not yet in the host's ledger: the
        # next claim must not hand it out again.
        self._unadmitted: dict[str, int] = {}

    def claimed(self, job_id: str, memory_mib: int) -> None:
        self._unadmitted[job_id] = memory_mib

    def forget(self, job_id: str) -> None:
        """The job's run is over (or its sandbox was asked for): it takes no more room."""
        self._unadmitted.pop(job_id, None)

    def free_memory_mib(self) -> int:
        """What the host can still give sandboxes, less what claimed jobs will take."""
        return self.engine.free_memory_mib() - sum(self._unadmitted.values())

    async def open(
        self,
        job_id: str,
        *,
        template: str,
        isolation: str,
        limits: Limits,
        network: NetworkPolicy,
        entrypoint: Entrypoint | None,
        volumes: tuple[VolumeMount, ...] = (),
    ) -> JobSandbox:
        """A sandbox as asked: a warm one from the pool when one is ready and fits; else
        one-shot, running `entrypoint`, where the tier can; else a new one."""
        try:
            return JobSandbox(
                await self._acquire(template, isolation, limits, network, entrypoint, volumes)
            )
        finally:  # in the ledger now (or refused): counted there, not here
            self.forget(job_id)

    async def _acquire(
        self,
        template: str,
        isolation: str,
        limits: Limits,
        network: NetworkPolicy,
        entrypoint: Entrypoint | None,
        volumes: tuple[VolumeMount, ...],
    ) -> Sandbox:
        if (too_big := never_fits(limits.memory_mib, self.engine.memory_capacity)) is not None:
            raise too_big  # before the engine destroys warm spares to make room in vain
        backend = await self.engine.load(isolation)  # a first probe off the loop
        # Pooled sandboxes have no network and no volumes: a job with either starts its own.
        if (
            network.mode == "none"
            and not volumes
            and self.pool.fits(template, backend.name, limits)
        ):
            pooled = self.pool.claim()
            if pooled is not None:
                try:
                    await self.engine.set_limits(pooled, limits)
                    return pooled
                except CorralError as exc:
                    log.warning("pooled sandbox refused the job's limits: %s", exc)
                    await pooled.destroy()
        return await self.engine.create(
            template=template,
            limits=limits,
            network=network,
            isolation=isolation,
            entrypoint=entrypoint if backend.entrypoints else None,
            volumes=volumes,
        )
