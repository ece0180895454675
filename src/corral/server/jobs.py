"""JobService: the job queue's RPCs, each authenticated and checked, over `JobQueue`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from connectrpc.request import RequestContext
from google.protobuf.struct_pb2 import Struct

from corral._state_enums import JOB_STATE_NAMES, JOB_STATE_NUMBERS
from corral.errors import InvalidRequest, ServerUnavailable
from corral.jobs.queue import JobQueue
from corral.jobs.records import JobRecord
from corral.jobs.spec import JobSpec
from corral.server import convert, disconnect
from corral.server.base import Handlers
from corral.store.job_logs import LogChunkRow
from corral.store.job_rows import JobEventRow
from corral.v1 import jobs_pb2 as pb

Ctx = RequestContext[Any, Any]

# How long Cancel waits for a running job to stop: a worker in this process stops it at
# once; one elsewhere at its next heartbeat (a third of its lease), and Cancel may answer
# before that with the job still running.
CANCEL_WAIT = 5.0


def job_message(job: JobRecord, *, file_contents: bool = True) -> pb.Job:
    """The API's view of a job; List leaves files' contents out (a page of jobs with
    megabytes of files each would not fit a response)."""
    message = pb.Job(
        id=job.id,
        state=JOB_STATE_NUMBERS[job.state],
        state_reason=job.state_reason,
        spec=job.spec.to_proto(),
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        created_at=convert.timestamp(job.created_at),
        started_at=convert.timestamp(job.started_at),
        finished_at=convert.timestamp(job.finished_at),
        worker=job.worker or "",
        log_bytes=job.log_bytes,
        log_truncated=job.log_truncated,
        log_limit_bytes=job.log_limit_bytes,
        idempotency_key=job.idempotency_key or "",
        run_after=convert.timestamp(job.run_after) if job.run_after is not None else None,
    )
    if not file_contents:
        for f in message.spec.files:
            f.content = b""
    if job.exit_code is not None:
        message.exit_code = job.exit_code
    if job.callback is not None:
        message.callback.CopyFrom(
            pb.CallbackStatus(
                url=job.callback.url,
                delivered=job.callback.delivered,
                pending=job.callback.pending,
                failed=job.callback.failed,
                last_error=job.callback.last_error,
            )
        )
    return message


Row = TypeVar("Row")
Message = TypeVar("Message", pb.StreamJobLogsResponse, pb.StreamJobEventsResponse)


async def _messages(
    batches: AsyncIterator[tuple[list[Row], JobRecord | None]],
    message: Callable[[list[Row]], Message],
) -> AsyncIterator[Message]:
    """One stream message per non-empty batch; the last says how the job ended."""
    async for rows, final in batches:
        if rows or final is not None:
            out = message(rows)
            if final is not None:
                out.final_state = JOB_STATE_NUMBERS[final.state]
            yield out


def chunk_message(row: LogChunkRow) -> pb.LogChunk:
    return pb.LogChunk(
        seq=row.seq,
        stream=row.stream,  # type: ignore[arg-type]  # 1/2 are the LogStream numbers
        data=row.data,
        attempt=row.attempt,
        step=row.step,
        at=convert.timestamp(row.at),
    )


def event_message(row: JobEventRow) -> pb.JobEvent:
    data = Struct()
    data.update(row.data)
    return pb.JobEvent(
        seq=row.seq,
        type=row.type,
        at=convert.timestamp(row.at),
        attempt=row.attempt,
        state=row.state or "",
        reason=row.reason,
        data=data,
    )


class JobHandlers(Handlers):
    """Every RPC of `corral.v1.JobService`."""

    @property
    def _queue(self) -> JobQueue:
        if self._services.jobs is None:
            raise ServerUnavailable("the Corral server is starting or stopping; try again")
        return self._services.jobs

    async def submit(self, request: pb.SubmitJobRequest, ctx: Ctx) -> pb.SubmitJobResponse:
        team = self._team(ctx)
        if not request.HasField("spec"):
            raise InvalidRequest("spec is missing: say what to run (kind and its fields)")
        spec = JobSpec.from_proto(request.spec)
        job, created, secret = await self._queue.submit(team, spec, request.idempotency_key)
        return pb.SubmitJobResponse(job=job_message(job), callback_secret=secret, created=created)

    async def get(self, request: pb.GetJobRequest, ctx: Ctx) -> pb.GetJobResponse:
        team = self._team(ctx)
        return pb.GetJobResponse(job=job_message(self._queue.get(team, request.job_id)))

    async def list(self, request: pb.ListJobsRequest, ctx: Ctx) -> pb.ListJobsResponse:
        team = self._team(ctx)
        states = convert.states(request.states, JOB_STATE_NAMES, "JobState")
        page_size = convert.page_size(request.page_size)
        jobs, token = self._queue.list_jobs(
            team,
            states=states,
            labels=dict(request.labels),
            template=request.template,
            page_size=page_size,
            page_token=request.page_token,
        )
        return pb.ListJobsResponse(
            jobs=[job_message(job, file_contents=False) for job in jobs],
            next_page_token=token,
        )

    async def stream_logs(
        self, request: pb.StreamJobLogsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.StreamJobLogsResponse]:
        batches = self._queue.follow_logs(
            self._team(ctx),
            request.job_id,
            offset=request.offset,
            follow=request.follow,
            stop=disconnect.current(),  # an abandoned follow ends with its client
        )
        messages = _messages(
            batches,
            lambda rows: pb.StreamJobLogsResponse(chunks=[chunk_message(r) for r in rows]),
        )
        async for message in messages:
            yield message

    async def stream_events(
        self, request: pb.StreamJobEventsRequest, ctx: Ctx
    ) -> AsyncIterator[pb.StreamJobEventsResponse]:
        batches = self._queue.follow_events(
            self._team(ctx),
            request.job_id,
            offset=request.offset,
            follow=request.follow,
            stop=disconnect.current(),
        )
        messages = _messages(
            batches,
            lambda rows: pb.StreamJobEventsResponse(events=[event_message(r) for r in rows]),
        )
        async for message in messages:
            yield message

    async def cancel(self, request: pb.CancelJobRequest, ctx: Ctx) -> pb.CancelJobResponse:
        team = self._team(ctx)
        job = self._queue.cancel(team, request.job_id, request.reason)
        if not job.final:  # running: answer once its worker has stopped it, if that is soon
            job = await self._queue.wait_final(job.id, CANCEL_WAIT)
        return pb.CancelJobResponse(job=job_message(job))

    async def retry(self, request: pb.RetryJobRequest, ctx: Ctx) -> pb.RetryJobResponse:
        team = self._team(ctx)
        return pb.RetryJobResponse(job=job_message(self._queue.retry(team, request.job_id)))
