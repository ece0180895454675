"""One attempt of one job: a fresh sandbox, the job's files, its steps in order, its
output into the store, and how it ended.

A workflow stops at its first failing step unless that step says `continue_on_error`;
every step of a workflow has a `step_start` and a `step_end` event (exit code, duration).
The job's timeout covers every step; a step's own timeout only that step. Whatever
ends the attempt — its end, a timeout, a cancel, a lost lease — the sandbox is
destroyed, which kills every process the job started.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from corral import logs
from corral.errors import CapacityExceeded, CorralError, Forbidden, IsolationUnavailable
from corral.isolation import Entrypoint, Limits, SeedFile
from corral.isolation.volumes import VolumeMount
from corral.job_lifecycle import StopReason
from corral.jobs.queue import JobSignals
from corral.jobs.sandbox import JobSandbox, JobSandboxes, source_path
from corral.jobs.spec import JobSpec, Step
from corral.network.policy import NetworkPolicy
from corral.sandboxes.network_events import NetworkEventPump
from corral.store import Store
from corral.store.job_rows import Attempt, NewEvent
from corral.volumes import VolumeSpec

log = logging.getLogger("corral.jobs")
R = TypeVar("R")

STDOUT, STDERR = 1, 2
# Output is written to the store at most this often per job, in one transaction, so a
# chatty job costs a few commits a second, not one per line; the first chunk after a
# quiet spell goes out at once (queue latency is measured to the first output).
FLUSH_SECONDS = 0.02
FLUSH_BYTES = 256 * 1024
# A job's commands may print this much before they are stopped; the job's own log limit
# (smaller) truncates what is kept, and the command goes on.
EXEC_OUTPUT_LIMIT = 1 << 40


@dataclass(frozen=True)
class Policy:
    """The worker-wide defaults that fill what a job's spec leaves out."""

    template: str = "host"
    isolation: str = "auto"
    limits: Limits = field(default_factory=Limits)
    # The most a job's network may be (Warrant's runner tightens: a job that asks for
    # more fails, saying what); None: what the server's caps let it submit. A job that
    # names no network gets `none`.
    network: NetworkPolicy | None = None
    timeout: int = 300
    workdir: str = "/workspace"
    log_limit: int = 16 * 1024 * 1024

    def limits_for(self, spec: JobSpec) -> Limits:
        base = {name: getattr(self.limits, name) for name in Limits.__dataclass_fields__}
        return Limits(**{**base, **spec.limits})


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: a final state (or, not this attempt's to record: "lost",
    "shutdown", or "no_room": the host had no room for its sandbox, so nothing ran), why,
    and the exit code of the last step run."""

    state: str
    reason: str
    exit_code: int | None = None


class AttemptLost(Exception):
    """The attempt's lease is gone: another worker may run the job now."""


class Stop:
    """Why a running attempt must stop early (`StopReason`), once it must."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.why: StopReason | Literal[""] = ""

    def set(self, why: StopReason) -> None:
        if not self.why:
            self.why = why
        self.event.set()


class LogWriter:
    """Buffers an attempt's output and writes it to the store in order."""

    def __init__(self, store: Store, attempt: Attempt, limit: int, signals: JobSignals) -> None:
        self.store = store
        self.attempt = attempt
        self.limit = limit
        self.signals = signals
        self.lost = False
        self._chunks: list[tuple[int, int, bytes]] = []
        self._size = 0
        self._last_flush = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, step: int, stream: int, data: bytes) -> None:
        if self.lost:
            raise AttemptLost(self.attempt.job_id)
        self._chunks.append((step, stream, data))
        self._size += len(data)
        now = time.monotonic()
        if self._size >= FLUSH_BYTES or now - self._last_flush >= FLUSH_SECONDS:
            self.flush()
        elif self._timer is None:
            wait = FLUSH_SECONDS - (now - self._last_flush)
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        try:
            self.flush()
        except Exception:  # a timer callback has no caller to raise to
            log.exception("writing job output failed", extra={"job_id": self.attempt.job_id})

    def flush(self) -> None:
        """Write what is buffered; raises AttemptLost when the job is no longer ours."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last_flush = time.monotonic()
        if not self._chunks or self.lost:
            return
        chunks, self._chunks, self._size = self._chunks, [], 0
        owner, _ = self.store.append_logs(self.attempt, chunks, self.limit)
        if not owner:
            self.lost = True
            raise AttemptLost(self.attempt.job_id)
        self.signals.changed(self.attempt.job_id)


class AttemptRunner:
    """Runs one attempt; `run()` returns its Outcome and always destroys the sandbox."""

    def __init__(
        self,
        store: Store,
        signals: JobSignals,
        policy: Policy,
        attempt: Attempt,
        spec: JobSpec,
        sandboxes: JobSandboxes,
        stop: Stop,
        volumes: Callable[[Sequence[VolumeSpec]], tuple[VolumeMount, ...]] | None = None,
        commands_over: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        # Called once the attempt's last command is over, before its sandbox is destroyed.
        self.commands_over = commands_over
        # The engine's mounts of the spec's volumes (its team's; resolved at each attempt:
        # one deleted since the submit fails the attempt with UnknownVolume).
        self.volumes = volumes
        self.signals = signals
        self.policy = policy
        self.attempt = attempt
        self.spec = spec
        self.sandboxes = sandboxes
        self.stop = stop
        self.logs = LogWriter(store, attempt, policy.log_limit, signals)
        self.workdir = spec.workdir or policy.workdir
        self.timeout = spec.timeout or policy.timeout
        # Which run this is, for commands that must be safe to repeat (at-least-once).
        self.job_env = {"CORRAL_JOB_ID": attempt.job_id, "CORRAL_JOB_ATTEMPT": str(attempt.attempt)}

    async def run(self) -> Outcome:
        deadline = time.monotonic() + self.timeout
        sandbox: JobSandbox | None = None
        network: NetworkEventPump | None = None
        try:
            try:
                sandbox = await self._until_stopped(self._open(deadline), deadline)
            except CapacityExceeded as exc:
                return Outcome("no_room", str(exc))
            if sandbox is None:
                return self._stopped(None, "while its sandbox started")
            logs.bind(sandbox_id=sandbox.sandbox.id)  # the job's later lines name its sandbox
            network = NetworkEventPump(
                self.store,
                sandbox.sandbox,
                attempt=self.attempt,
                on_stored=lambda: self.signals.changed(self.attempt.job_id),
            )
            await sandbox.place_files(self.workdir, self.spec.files, bool(self.spec.workdir))
            outcome = await self._steps(sandbox, deadline)
            if self.commands_over is not None:
                self.commands_over()
            return outcome
        except AttemptLost:
            return Outcome("lost", "the job's lease was lost")
        except CorralError as exc:
            return Outcome("failed", f"failed: {exc}")
        finally:
            if sandbox is not None:
                try:
                    await sandbox.destroy()
                except Exception:
                    log.exception("destroying a job's sandbox failed")
            if network is not None:  # stored before the attempt's end is
                await network.stop()

    async def _until_stopped(self, work: Awaitable[R], deadline: float) -> R | None:
        """`work`'s result, or None when the attempt is stopped or times out first (the
        work is then cancelled)."""
        task = asyncio.ensure_future(work)
        stopper = asyncio.ensure_future(self.stop.event.wait())
        try:
            await asyncio.wait(
                (task, stopper),
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            result = await task
        except asyncio.CancelledError:
            return None
        if isinstance(result, JobSandbox):  # it started just as we gave up
            await result.destroy()
        return None

    def _open(self, deadline: float) -> Awaitable[JobSandbox]:
        """The attempt's sandbox as the spec asks, the policy filling what it leaves out."""
        network = self.spec.network_policy
        if self.policy.network is not None and (more := network.exceeds(self.policy.network)):
            self.sandboxes.forget(self.attempt.job_id)
            raise Forbidden(
                f"the job asks for {more}, more than this worker allows (network "
                f"{self.policy.network}); submit it with less, or to workers that allow it"
            )
        mounts: tuple[VolumeMount, ...] = ()
        if self.spec.volumes:
            if self.volumes is None:
                self.sandboxes.forget(self.attempt.job_id)
                raise IsolationUnavailable("this worker cannot mount volumes")
            try:
                mounts = self.volumes(self.spec.volumes)
            except BaseException:
                self.sandboxes.forget(self.attempt.job_id)
                raise
        return self.sandboxes.open(
            self.attempt.job_id,
            template=self.spec.template or self.policy.template,
            isolation=self.spec.isolation or self.policy.isolation,
            limits=self.policy.limits_for(self.spec),
            network=network,
            entrypoint=self._entrypoint(deadline),
            volumes=mounts,
        )

    def _entrypoint(self, deadline: float) -> Entrypoint | None:
        """A job of one command needs no guest agent: its sandbox can start as that
        command (a third cheaper). Workflows run their steps through the agent."""
        if self.spec.kind == "workflow":
            return None
        step = self.spec.workloads[0]
        files = [
            SeedFile(posixpath.join(self.workdir, f.path), f.content, f.mode)
            for f in self.spec.files
        ]
        source = source_path(0, step)
        if source:
            files.append(SeedFile(source, step.workload.code.encode(), 0o600))
        return Entrypoint(
            argv=step.workload.argv(source),
            env=self._env(step),
            cwd=self.workdir,
            files=files,
            timeout=max(0.001, deadline - time.monotonic()),
            output_limit=EXEC_OUTPUT_LIMIT,
        )

    def _env(self, step: Step) -> dict[str, str]:
        return {**self.job_env, **self.spec.env, **step.env}

    async def _steps(self, sandbox: JobSandbox, deadline: float) -> Outcome:
        workflow = self.spec.kind == "workflow"
        failed: Outcome | None = None
        exit_code: int | None = None
        for index, step in enumerate(self.spec.workloads):
            if workflow:
                self._event(
                    "step_start", f"{step.label(index)} started", step=index, name=step.label(index)
                )
            started = time.monotonic()
            outcome = await self._step(sandbox, index, step, deadline)
            self.logs.flush()
            exit_code = outcome.exit_code
            if workflow:
                self._event(
                    "step_end",
                    outcome.reason,
                    step=index,
                    name=step.label(index),
                    exit_code=outcome.exit_code,
                    state=outcome.state,
                    duration_ms=round((time.monotonic() - started) * 1000, 1),
                )
            if outcome.state in ("canceled", "lost", "shutdown"):
                return outcome
            if outcome.state != "succeeded":
                if outcome.state == "timed_out" and time.monotonic() >= deadline:
                    return outcome  # the job's own time is up: no later step can run
                if not step.continue_on_error:
                    return outcome
                failed = failed or outcome
        if failed is not None:
            return Outcome("succeeded", f"done; failed but continued: {failed.reason}", exit_code)
        if workflow:
            return Outcome("succeeded", "every step succeeded", exit_code)
        return Outcome("succeeded", "exited with code 0", exit_code)

    async def _step(self, sandbox: JobSandbox, index: int, step: Step, deadline: float) -> Outcome:
        label = f"{step.label(index)}: " if self.spec.kind == "workflow" else ""
        left = deadline - time.monotonic()
        if left <= 0:
            return Outcome("timed_out", f"{label}timed out: the job's {self.timeout}s ran out")
        command = await sandbox.start(
            index,
            step,
            env=self._env(step),
            cwd=self.workdir,
            timeout=min(float(step.timeout), left) if step.timeout else left,
            output_limit=EXEC_OUTPUT_LIMIT,
        )

        async def pump() -> None:
            async for chunk in command:
                stream = STDOUT if chunk.stream == "stdout" else STDERR
                self.logs.add(index, stream, chunk.data)

        pumping = asyncio.ensure_future(pump())
        stopper = asyncio.ensure_future(self.stop.event.wait())
        try:
            await asyncio.wait((pumping, stopper), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not pumping.done():
            await command.kill()
            pumping.cancel()
            await asyncio.gather(pumping, return_exceptions=True)
            why = self.stop.why
            if why == "cancel":
                return Outcome("canceled", f"canceled: {self._cancel_reason()}")
            return Outcome(why, f"stopped: {why}")
        pumping.result()  # AttemptLost from the writer goes up from here
        result = await command.wait()
        code = result.exit_code
        if result.reason == "exited":
            if code == 0:
                return Outcome("succeeded", f"{label}exited with code 0", 0)
            detail = f" ({result.error})" if result.error else ""
            return Outcome("failed", f"{label}exited with code {code}{detail}", code)
        if result.reason == "timeout":
            if step.timeout and step.timeout < left:
                return Outcome("timed_out", f"{label}timed out after its {step.timeout}s", code)
            return Outcome(
                "timed_out", f"{label}timed out: the job's {self.timeout}s ran out", code
            )
        if result.reason == "oom_killed":
            return Outcome("failed", f"{label}ran out of memory (raise limits.memory_mib)", code)
        return Outcome("failed", f"{label}{result.reason}: {result.error or f'exit {code}'}", code)

    def _cancel_reason(self) -> str:
        row = self.store.job(self.attempt.job_id)
        return (row.cancel_reason if row else None) or "by request"

    def _event(self, kind: str, reason: str, **data: object) -> None:
        if not self.store.add_events(self.attempt, [NewEvent(kind, reason, None, data)]):
            raise AttemptLost(self.attempt.job_id)
        self.signals.changed(self.attempt.job_id)

    def _stopped(self, exit_code: int | None, when: str) -> Outcome:
        if self.stop.why == "cancel":
            return Outcome("canceled", f"canceled: {self._cancel_reason()}", exit_code)
        if self.stop.why:
            return Outcome(self.stop.why, f"stopped {when}: {self.stop.why}", exit_code)
        return Outcome("timed_out", f"timed out {when}: the job's {self.timeout}s ran out")
