"""The job kind `build`: one attempt of a template build (`corral.templates.builder`).

The build's output is the job's log (each plan step its own `step`, as a workflow's
steps are), its progress the job's events (`step_start` "step i/N TEXT", `cached`,
`pulled`, `step_end`). The job ends with the build: succeeded when the template is
ready; failed (the template's `error` names the step and its log's tail); canceled
(the template is `cancelled`; a rebuild's older ready version keeps serving). A
shutdown or a lost lease leaves the template `building`: the job is run again.
"""

from __future__ import annotations

import asyncio
import logging

from corral.errors import BuildFailed, CorralError
from corral.jobs.queue import JobSignals
from corral.jobs.runner import AttemptLost, LogWriter, Outcome, Policy, Stop
from corral.jobs.spec import JobSpec
from corral.store import Store
from corral.store.job_rows import Attempt, NewEvent
from corral.templates import TemplateCatalog
from corral.templates.builder import Builder, BuildResult

log = logging.getLogger("corral.jobs")


class BuildRunner:
    """Runs one attempt of a build job; `run()` returns its Outcome."""

    def __init__(
        self,
        store: Store,
        signals: JobSignals,
        policy: Policy,
        attempt: Attempt,
        spec: JobSpec,
        catalog: TemplateCatalog,
        stop: Stop,
    ) -> None:
        self.store = store
        self.signals = signals
        self.attempt = attempt
        self.spec = spec
        self.catalog = catalog
        self.stop = stop
        self.logs = LogWriter(store, attempt, policy.log_limit, signals)
        self.timeout = spec.timeout or catalog.settings.build_timeout

    # BuildReport
    def log(self, step: int, stream: int, data: bytes) -> None:
        self.logs.add(step, stream, data)

    def event(self, kind: str, reason: str, **data: object) -> None:
        self.logs.flush()  # the output before the event is stored before it
        if not self.store.add_events(self.attempt, [NewEvent(kind, reason, None, data)]):
            raise AttemptLost(self.attempt.job_id)
        self.signals.changed(self.attempt.job_id)

    async def run(self) -> Outcome:
        row = self.store.template(self.spec.build)
        if row is None or row.state != "building":
            return Outcome("canceled", "canceled: its template was deleted or ended meanwhile")
        try:
            builder = Builder(self.catalog, row, self)
        except (CorralError, KeyError, TypeError, ValueError) as exc:
            return self._end(row.id, "failed", f"the build's plan cannot be read: {exc}")
        work = asyncio.ensure_future(builder.run())
        stopper = asyncio.ensure_future(self.stop.event.wait())
        try:
            await asyncio.wait(
                (work, stopper),
                timeout=self.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            why = self.stop.why
            if why == "cancel":
                return self._end(row.id, "cancelled", f"canceled: {self._cancel_reason()}")
            if why:  # shutdown, lost: the job runs again, the template stays building
                return Outcome(why, f"stopped: {why}")
            return self._end(row.id, "failed", f"timed out after {self.timeout} s")
        try:
            result = work.result()
        except AttemptLost:
            return Outcome("lost", "the job's lease was lost")
        except BuildFailed as exc:
            return self._end(row.id, "failed", str(exc))
        except CorralError as exc:
            return self._end(row.id, "failed", f"failed: {exc}")
        return self._ready(row.id, row.name, result)

    def _ready(self, template_id: str, name: str, result: BuildResult) -> Outcome:
        try:
            done, _ = self.catalog.finish(
                template_id,
                "ready",
                layers=result.layers,
                env=result.env,
                workdir=result.workdir,
                user=result.user,
                start_cmd=result.start_cmd,
                ready_cmd=result.ready_cmd,
                size_bytes=result.size_bytes,
                steps_cached=result.steps_cached,
            )
        except CorralError as exc:  # past the team's byte quota
            return self._end(template_id, "failed", str(exc))
        if done is None:
            return Outcome("canceled", "canceled: its template was deleted meanwhile")
        self.logs.flush()
        self._collect()
        return Outcome(
            "succeeded",
            f"template {name!r} is ready ({len(result.layers)} layers, "
            f"{result.steps_cached} steps cached)",
            0,
        )

    def _collect(self) -> None:
        """What the replaced version used (past the collector's grace) goes now."""
        try:
            self.catalog.collect()
        except Exception:  # the next build or delete collects them
            log.exception("collecting unused layers failed")

    def _end(self, template_id: str, state: str, error: str) -> Outcome:
        self.catalog.finish(template_id, state, error=error[:16384])
        try:
            self.logs.flush()
        except AttemptLost:
            return Outcome("lost", "the job's lease was lost")
        if state == "cancelled":
            return Outcome("canceled", error)
        if error.startswith("timed out"):
            return Outcome("timed_out", error)
        return Outcome("failed", error, 1)

    def _cancel_reason(self) -> str:
        job = self.store.job(self.attempt.job_id)
        return (job.cancel_reason if job else None) or "by request"
