"""`AsyncJobs`: submit jobs to a Corral server, read them, follow their logs and events.

    async with AsyncJobs() as jobs:
        submission = await jobs.submit(run="make test", retries=2, labels={"ci": "1"})
        async for chunk in jobs.logs(submission.job.id, follow=True):
            print(chunk.data.decode(), end="")
        job = await jobs.wait(submission.job.id)        # job.state == "succeeded"

A spec is checked here before it is sent (`corral.jobs.spec.JobSpec.from_dict`), so a
bad one fails at once with the field named. Following (`follow=True`) outlives the
server: when the connection drops, the SDK reconnects from the next unseen chunk for up
to `reconnect_timeout` seconds, so nothing is lost or shown twice.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

from corral._state_enums import JOB_STATE_NUMBERS
from corral.client._config import ClientSettings
from corral.client._connection import Connection
from corral.client._models import (
    Job,
    JobEvent,
    JobSubmission,
    LogChunk,
)
from corral.errors import InvalidRequest, ServerUnavailable, WaitTimedOut
from corral.jobs.spec import JobSpec, split_idempotency_key
from corral.v1 import jobs_pb2 as pb

M = TypeVar("M", pb.StreamJobLogsResponse, pb.StreamJobEventsResponse)

DEFAULT_RECONNECT_TIMEOUT = 60.0
# Between reconnection attempts: the first delay, doubled up to the cap.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 2.0
# A stream that stayed open this long had a server: its loss starts a new outage.
HEALTHY_STREAM = 5.0


def build_spec(spec: Mapping[str, Any] | JobSpec | None, fields: Mapping[str, Any]) -> JobSpec:
    """The validated spec of `submit`: a mapping or JobSpec, with `fields` on top."""
    if spec is None:
        data: dict[str, Any] = {}
    elif isinstance(spec, JobSpec):
        if not fields:
            return spec
        data = spec.to_dict()
    elif isinstance(spec, Mapping):
        data = dict(spec)
    else:
        raise InvalidRequest(
            f"spec must be a mapping of spec fields or a JobSpec, got {type(spec).__name__}"
        )
    data.update(fields)
    if not data:
        raise InvalidRequest(
            "say what to run: submit(command=[...]), submit(run='...'), "
            "submit(code='...', language='python') or submit({'kind': 'workflow', ...})"
        )
    return JobSpec.from_dict(data)


class AsyncJobs:
    """Your team's jobs on a Corral server.

    The server and API key come from the arguments, else `CORRAL_SERVER` and
    `CORRAL_API_KEY`, else the CLI's current context (see `corral context`).
    """

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        request_timeout: float | None = None,
        reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT,
    ) -> None:
        settings = ClientSettings.resolve(
            server=server,
            api_key=api_key,
            context=context,
            ca_file=ca_file,
            timeout=request_timeout,
        )
        self._connection = Connection(settings)
        self.reconnect_timeout = reconnect_timeout

    @property
    def server(self) -> str:
        return self._connection.settings.server

    def __repr__(self) -> str:
        return f"<AsyncJobs {self.server}>"

    async def submit(
        self,
        spec: Mapping[str, Any] | JobSpec | None = None,
        /,
        *,
        idempotency_key: str = "",
        **fields: Any,
    ) -> JobSubmission:
        """Queue a job; `spec` and `fields` are the YAML spec's fields:

            await jobs.submit(command=["echo", "hi"])
            await jobs.submit(run="echo hi", retries=2)
            await jobs.submit({"kind": "workflow", "steps": [{"run": "make"}]})

        With an `idempotency_key` (an argument, or a field of the `spec` mapping as in a
        spec file), submitting the same key again returns the first job (`created` is
        False) instead of queueing another; the same key with another spec is refused
        (IdempotencyConflict).
        """
        if isinstance(spec, Mapping):
            spec, key = split_idempotency_key(spec)
            if key and idempotency_key and key != idempotency_key:
                raise InvalidRequest(
                    f"idempotency_key {idempotency_key!r} differs from the spec's {key!r}; "
                    "give one of them"
                )
            idempotency_key = idempotency_key or key
        request = pb.SubmitJobRequest(
            spec=build_spec(spec, fields).to_proto(), idempotency_key=idempotency_key
        )
        rpc = self._connection.jobs
        reply = await self._connection.call(rpc.submit, request)
        return JobSubmission(
            job=Job.from_proto(reply.job),
            callback_secret=reply.callback_secret,
            created=reply.created,
        )

    async def get(self, job_id: str) -> Job:
        rpc = self._connection.jobs
        reply = await self._connection.call(rpc.get, pb.GetJobRequest(job_id=job_id))
        return Job.from_proto(reply.job)

    async def list(
        self,
        states: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        template: str = "",
        page_size: int = 100,
    ) -> AsyncIterator[Job]:
        """Your team's jobs, newest first, every page (fetched `page_size` at a time as
        you iterate): those in any of `states`, with every one of `labels`."""
        if isinstance(states, str):
            states = (states,)
        unknown = [s for s in states if s not in JOB_STATE_NUMBERS]
        if unknown:
            raise InvalidRequest(
                f"unknown job state {unknown[0]!r}: use {', '.join(JOB_STATE_NUMBERS)}"
            )
        if not 1 <= page_size <= 1000:
            raise InvalidRequest(f"page_size={page_size} is out of range: use 1 to 1000")
        rpc = self._connection.jobs
        token = ""
        while True:
            request = pb.ListJobsRequest(
                states=[JOB_STATE_NUMBERS[s] for s in states],
                labels=dict(labels or {}),
                template=template,
                page_size=page_size,
                page_token=token,
            )
            reply = await self._connection.call(rpc.list, request)
            for job in reply.jobs:
                yield Job.from_proto(job)
            token = reply.next_page_token
            if not token:
                return

    async def logs(
        self, job_id: str, offset: int = 0, follow: bool = False
    ) -> AsyncIterator[LogChunk]:
        """The job's output from chunk `offset` on, across its attempts (each chunk says
        which). With `follow`, until the job ends, reconnecting if the server goes."""
        request = pb.StreamJobLogsRequest
        messages = self._follow(self._connection.jobs.stream_logs, request, job_id, offset, follow)
        async for message in messages:
            for chunk in message.chunks:
                yield LogChunk.from_proto(chunk)

    async def events(
        self, job_id: str, offset: int = 0, follow: bool = False
    ) -> AsyncIterator[JobEvent]:
        """The job's state changes and workflow step events from `offset` on; `follow`
        as for `logs`."""
        request = pb.StreamJobEventsRequest
        stream = self._connection.jobs.stream_events
        async for message in self._follow(stream, request, job_id, offset, follow):
            for event in message.events:
                yield JobEvent.from_proto(event)

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once it has ended (follows its events; survives a server restart).

        Raises WaitTimedOut (a TimeoutError) if it is still queued or running after
        `timeout` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.events(job_id, follow=True):
                    pass
        except TimeoutError:
            raise WaitTimedOut(
                f"job {job_id} had not ended after {timeout:g} s; wait again, "
                f"or stop it with cancel({job_id!r})"
            ) from None
        return await self.get(job_id)

    async def cancel(self, job_id: str, reason: str = "") -> Job:
        """Stop a queued or running job (its sandbox is killed); a finished one is left
        as it is. A running job comes back stopped, or still running after 5 s when its
        worker is another process (which stops it at its next heartbeat)."""
        request = pb.CancelJobRequest(job_id=job_id, reason=reason)
        reply = await self._connection.call(self._connection.jobs.cancel, request)
        return Job.from_proto(reply.job)

    async def retry(self, job_id: str) -> Job:
        """Queue a finished job again for one more attempt, from the start."""
        request = pb.RetryJobRequest(job_id=job_id)
        reply = await self._connection.call(self._connection.jobs.retry, request)
        return Job.from_proto(reply.job)

    async def aclose(self) -> None:
        """Close the connection; the jobs go on."""
        await self._connection.aclose()

    async def __aenter__(self) -> AsyncJobs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- following ----------------------------------------------------------------------

    async def _follow(
        self,
        method: Callable[..., AsyncIterator[M]],
        request: Callable[..., Any],
        job_id: str,
        offset: int,
        follow: bool,
    ) -> AsyncIterator[M]:
        """The stream's messages from `offset`; with `follow`, a lost connection (or a
        stream cut before the job's end) is opened again after the last item seen."""
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequest(f"offset={offset!r} must be a whole number >= 0")
        down_since: float | None = None
        backoff = FIRST_BACKOFF
        while True:
            opened = time.monotonic()
            try:
                messages = self._connection.stream(
                    method, request(job_id=job_id, offset=offset, follow=follow)
                )
                async for message in messages:
                    items = _items(message)
                    if items:
                        offset = items[-1].seq + 1
                    down_since, backoff = None, FIRST_BACKOFF
                    yield message
                    if message.HasField("final_state"):
                        return
                if not follow:
                    return
            except ServerUnavailable:
                if not follow:
                    raise
                lost = ServerUnavailable(
                    f"lost the Corral server at {self.server} while following job {job_id}, "
                    f"and it did not come back within {self.reconnect_timeout:g} s; "
                    f"follow again from offset {offset} once it is up"
                )
            else:
                lost = ServerUnavailable(
                    f"the stream of job {job_id} kept ending before the job did; "
                    f"follow again from offset {offset}"
                )
            now = time.monotonic()
            if down_since is None or now - opened > HEALTHY_STREAM:
                down_since = now
            if now - down_since >= self.reconnect_timeout:
                raise lost
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


def _items(message: M) -> list[Any]:
    if isinstance(message, pb.StreamJobLogsResponse):
        return list(message.chunks)
    return list(message.events)
