"""The jobs SDK, sync and async, against a real server process running real sandboxes."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

import corral
from corral import AsyncJobs, Job, JobEvent, Jobs, LogChunk
from corral.errors import InvalidRequest, NotFound, ServerUnavailable, WaitTimedOut
from corral.jobs.spec import JobSpec
from corral.states import JOB_FINAL_STATES
from tests.conftest import LiveServer, free_port, opts
from tests.kit.polling import wait_until

# The queue, its events and logs are the store's: on SQLite and on PostgreSQL.
pytestmark = [pytest.mark.usefixtures("sandbox_host"), pytest.mark.every_database]


def tag() -> dict[str, str]:
    """A label no other test's jobs carry, to list only this test's jobs."""
    return {"suite": secrets.token_hex(4)}


def running_or_over(jobs: Jobs, job_id: str) -> Job | None:
    job = jobs.get(job_id)
    return job if job.state in {"running", *JOB_FINAL_STATES} else None


def test_job_names_are_public() -> None:
    for name in ("Jobs", "AsyncJobs", "Job", "JobEvent", "JobSubmission", "LogChunk"):
        assert name in corral.__all__ and getattr(corral, name) is not None


# -- sync ----------------------------------------------------------------------------------


def test_submit_follow_logs_events_and_wait(server: LiveServer) -> None:
    labels = tag()
    with Jobs(**opts(server)) as jobs:
        submission = jobs.submit(
            run="echo out; echo err >&2; echo $WHO; exit 3", env={"WHO": "env"}, labels=labels
        )
        assert submission.created and submission.callback_secret == ""
        job = submission.job
        assert job.id.startswith("j") and job.state in ("queued", "running")
        assert job.spec == {
            "kind": "shell",
            "run": "echo out; echo err >&2; echo $WHO; exit 3",
            "env": {"WHO": "env"},
            "labels": labels,
        }

        chunks = list(jobs.logs(job.id, follow=True))  # returns when the job ends
        assert all(isinstance(c, LogChunk) for c in chunks)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        by_stream = {
            s: b"".join(c.data for c in chunks if c.stream == s) for s in ("stdout", "stderr")
        }
        assert by_stream == {"stdout": b"out\nenv\n", "stderr": b"err\n"}
        assert {c.attempt for c in chunks} == {1}

        done = jobs.wait(job.id, timeout=30)
        assert (done.state, done.exit_code, done.attempt) == ("failed", 3, 1)
        assert "exited with code 3" in done.state_reason
        assert done.done and done.finished_at is not None and done.log_bytes == 12

        events = list(jobs.events(job.id))
        assert all(isinstance(e, JobEvent) for e in events)
        states = [e.state for e in events if e.type == "state"]
        assert states == ["queued", "running", "failed"]
        assert events[-1].data["exit_code"] == 3

        # From an offset: only what follows it.
        assert [c.seq for c in jobs.logs(job.id, offset=chunks[-1].seq)] == [chunks[-1].seq]
        assert [e.seq for e in jobs.events(job.id, offset=1)] == [e.seq for e in events[1:]]
        assert jobs.get(job.id) == done


def test_a_spec_comes_as_a_mapping_fields_or_a_jobspec(server: LiveServer) -> None:
    with Jobs(**opts(server)) as jobs:
        base = {"kind": "command", "command": ["python3", "-c", "print(6 * 7)"]}
        from_mapping = jobs.submit(base, retries=1).job  # fields on top of the mapping
        assert from_mapping.spec == {**base, "retries": 1} and from_mapping.max_attempts == 2
        spec = JobSpec.from_dict({"code": "print('from code')", "language": "python"})
        from_spec = jobs.submit(spec).job
        workflow = jobs.submit(
            {"kind": "workflow", "steps": [{"run": "echo one"}, {"command": ["echo", "two"]}]}
        ).job
        for job, text in [
            (from_mapping, b"42\n"),
            (from_spec, b"from code\n"),
            (workflow, b"one\ntwo\n"),
        ]:
            assert jobs.wait(job.id, timeout=30).state == "succeeded"
            assert b"".join(c.data for c in jobs.logs(job.id)) == text


def test_list_filters_and_pages(server: LiveServer) -> None:
    labels = tag()
    with Jobs(**opts(server)) as jobs:
        ids = [jobs.submit(command=["true"], labels=labels).job.id for _ in range(5)]
        failing = jobs.submit(command=["false"], labels=labels).job.id
        for job_id in [*ids, failing]:
            jobs.wait(job_id, timeout=30)
        newest_first = [failing, *reversed(ids)]

        assert [j.id for j in jobs.list(labels=labels)] == newest_first
        assert [j.id for j in jobs.list(labels=labels, page_size=2)] == newest_first  # 3 pages
        assert [j.id for j in jobs.list(states=["failed"], labels=labels)] == [failing]
        assert [j.id for j in jobs.list(states=["queued", "running"], labels=labels)] == []
        assert [j.id for j in jobs.list(labels=labels, template="host")] == newest_first
        assert list(jobs.list(labels=labels, template="nope")) == []
        assert list(jobs.list(labels={**labels, "other": "x"})) == []

        with pytest.raises(InvalidRequest, match=r"unknown job state 'done'.*succeeded"):
            list(jobs.list(states=["done"]))
        with pytest.raises(InvalidRequest, match="page_size"):
            list(jobs.list(page_size=0))


def test_an_idempotency_key_returns_the_first_job(server: LiveServer) -> None:
    key = f"deploy-{secrets.token_hex(4)}"
    with Jobs(**opts(server)) as jobs:
        first = jobs.submit(command=["echo", "once"], idempotency_key=key)
        again = jobs.submit(command=["echo", "once"], idempotency_key=key)
        assert first.created and not again.created
        assert again.job.id == first.job.id and again.job.idempotency_key == key
        other = jobs.submit(command=["echo", "once"], idempotency_key=key + "-2")
        assert other.created and other.job.id != first.job.id


def test_callback_secret_is_given_once(server: LiveServer) -> None:
    key = f"cb-{secrets.token_hex(4)}"
    url = f"http://127.0.0.1:{free_port()}/hook"
    with Jobs(**opts(server)) as jobs:
        first = jobs.submit(command=["true"], callback_url=url, idempotency_key=key)
        assert len(first.callback_secret) == 64
        assert first.job.callback is not None and first.job.callback.url == url
        again = jobs.submit(command=["true"], callback_url=url, idempotency_key=key)
        assert again.callback_secret == ""  # only the call that created it gets it
        jobs.cancel(first.job.id)


def test_cancel_a_running_job_and_retry_it(server: LiveServer) -> None:
    with Jobs(**opts(server)) as jobs:
        job = jobs.submit(run="echo started; sleep 60").job
        # Its first output means it runs.
        first = next(iter(jobs.logs(job.id, follow=True)))
        assert first.data == b"started\n"
        canceled = jobs.cancel(job.id, reason="not needed")
        assert canceled.state in ("running", "canceled")
        ended = jobs.wait(job.id, timeout=30)
        assert ended.state == "canceled" and "not needed" in ended.state_reason
        assert jobs.cancel(job.id).state == "canceled"  # a finished job is left as it is

        retried = jobs.retry(job.id)
        assert retried.state == "queued" and retried.max_attempts == 2
        again = wait_until(lambda: running_or_over(jobs, job.id), "it to run again")
        assert again.state == "running" and again.attempt == 2
        with pytest.raises(InvalidRequest, match="only a finished job can be retried"):
            jobs.retry(job.id)
        jobs.cancel(job.id)
        assert jobs.wait(job.id, timeout=30).state == "canceled"


def test_retries_run_again_after_a_failure(server: LiveServer) -> None:
    with Jobs(**opts(server)) as jobs:
        job = jobs.submit(command=["sh", "-c", "exit 2"], retries=1, retry_backoff=0.1).job
        ended = jobs.wait(job.id, timeout=30)
        assert (ended.state, ended.attempt, ended.max_attempts) == ("failed", 2, 2)
        types = [e.type for e in jobs.events(job.id)]
        assert "retry_scheduled" in types


def test_wait_can_time_out(server: LiveServer) -> None:
    with Jobs(**opts(server)) as jobs:
        job = jobs.submit(command=["sleep", "60"]).job
        with pytest.raises(WaitTimedOut, match=rf"job {job.id} had not ended after 0\.5 s") as info:
            jobs.wait(job.id, timeout=0.5)
        assert isinstance(info.value, TimeoutError)  # what callers caught before
        assert not jobs.get(job.id).done
        jobs.cancel(job.id)


def test_bad_specs_fail_before_the_network_naming_the_field() -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: a sent spec would fail so
    with Jobs(server=dead, api_key="crl_" + "x" * 32) as jobs:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"comand": ["echo"]}, "unknown field 'comand'"),
            ({"command": "echo hi"}, "command: must be a non-empty list"),
            ({"run": "x", "retries": -1}, "retries: -1 is out of range"),
            ({"code": "print(1)"}, "language"),
            ({"kind": "workflow", "steps": [{"run": "x", "bogus": 1}]}, r"steps\[0\]: unknown"),
            ({}, "say what to run"),
        ]
        for fields, message in cases:
            with pytest.raises(InvalidRequest, match=message):
                jobs.submit(**fields)
        with pytest.raises(InvalidRequest, match="spec must be a mapping"):
            jobs.submit(["echo"])  # type: ignore[arg-type]


def test_unknown_jobs_are_not_found(server: LiveServer) -> None:
    with Jobs(**opts(server)) as jobs:
        for call in (jobs.get, jobs.cancel, jobs.retry, jobs.wait):
            with pytest.raises(NotFound, match="corral job list"):
                call("j0000000000000000000")
        with pytest.raises(NotFound):
            list(jobs.logs("j0000000000000000000"))


def test_following_gives_up_when_the_server_stays_away(server: LiveServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with Jobs(server=dead, api_key=server.key, reconnect_timeout=0.5) as jobs:
        with pytest.raises(ServerUnavailable, match="did not answer"):
            list(jobs.logs("j0000000000000000000"))  # not following: at once
        with pytest.raises(ServerUnavailable, match=r"did not come back within 0\.5 s"):
            list(jobs.logs("j0000000000000000000", follow=True))


# -- async ---------------------------------------------------------------------------------


async def test_async_jobs(server: LiveServer) -> None:
    labels = tag()
    async with AsyncJobs(**opts(server)) as jobs:
        submission = await jobs.submit(
            kind="workflow",
            labels=labels,
            steps=[
                {"name": "make", "run": "echo building"},
                {"name": "check", "command": ["sh", "-c", "echo checking; exit 1"]},
                {"name": "never", "run": "echo never"},
            ],
        )
        job_id = submission.job.id
        output = [chunk async for chunk in jobs.logs(job_id, follow=True)]
        assert b"".join(c.data for c in output) == b"building\nchecking\n"
        assert [c.step for c in output] == [0, 1]

        ended = await jobs.wait(job_id)
        assert (ended.state, ended.exit_code) == ("failed", 1)
        steps = [
            (e.type, e.data["step"], e.data.get("exit_code"))
            async for e in jobs.events(job_id)
            if e.type.startswith("step_")
        ]
        assert steps == [
            ("step_start", 0, None),
            ("step_end", 0, 0),
            ("step_start", 1, None),
            ("step_end", 1, 1),
        ]
        assert [j.id async for j in jobs.list(labels=labels)] == [job_id]
        assert (await jobs.get(job_id)).spec["steps"][2] == {"name": "never", "run": "echo never"}
