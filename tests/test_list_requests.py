"""The list requests of both services (sandboxes, jobs) share one check of their state
filter and page size (`corral.server.convert`)."""

from __future__ import annotations

from typing import cast

import pytest

from corral._state_enums import JOB_STATE_NAMES, SANDBOX_STATE_NAMES
from corral.errors import InvalidRequest
from corral.server import convert
from corral.v1 import jobs_pb2, sandbox_pb2


def test_state_filters_become_names_and_unknown_numbers_are_refused() -> None:
    boxes = sandbox_pb2.ListRequest(
        states=[sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED]
    )
    assert convert.states(boxes.states, SANDBOX_STATE_NAMES, "SandboxState") == [
        "running",
        "paused",
    ]
    jobs = jobs_pb2.ListJobsRequest(states=[jobs_pb2.JOB_STATE_QUEUED])
    assert convert.states(jobs.states, JOB_STATE_NAMES, "JobState") == ["queued"]
    assert convert.states(jobs_pb2.ListJobsRequest().states, JOB_STATE_NAMES, "JobState") == []

    bad_boxes = sandbox_pb2.ListRequest(states=[cast(sandbox_pb2.SandboxState, 99)])
    with pytest.raises(InvalidRequest, match="states has 99, which is not a SandboxState"):
        convert.states(bad_boxes.states, SANDBOX_STATE_NAMES, "SandboxState")
    bad_jobs = jobs_pb2.ListJobsRequest(states=[cast(jobs_pb2.JobState, 99)])
    with pytest.raises(InvalidRequest, match="states has 99, which is not a JobState"):
        convert.states(bad_jobs.states, JOB_STATE_NAMES, "JobState")


def test_page_size_zero_is_the_default_and_out_of_range_is_refused() -> None:
    assert convert.page_size(0) == 100
    assert convert.page_size(1) == 1
    assert convert.page_size(1000) == 1000
    for size in (-1, 1001):
        with pytest.raises(InvalidRequest, match=f"page_size={size} is out of range: use 0 to"):
            convert.page_size(size)
