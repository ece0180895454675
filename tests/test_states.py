"""Sandbox and job state names are defined once (`corral.states`) and agree with the API."""

from __future__ import annotations

from corral import _state_enums
from corral.states import JOB_FINAL_STATES, JOB_STATES, LIVE_SANDBOX_STATES, SANDBOX_STATES
from corral.v1 import jobs_pb2, sandbox_pb2


def _proto_names(enum_names: list[str], prefix: str) -> list[str]:
    return [n.removeprefix(prefix).lower() for n in enum_names if not n.endswith("UNSPECIFIED")]


def test_the_names_are_the_api_enums_values() -> None:
    # Each enum has every state (the maps would fail at import otherwise) and no other.
    assert _proto_names(sandbox_pb2.SandboxState.keys(), "SANDBOX_STATE_") == list(SANDBOX_STATES)
    assert _proto_names(jobs_pb2.JobState.keys(), "JOB_STATE_") == list(JOB_STATES)


def test_the_maps_go_both_ways() -> None:
    assert _state_enums.JOB_STATE_NUMBERS["timed_out"] == jobs_pb2.JOB_STATE_TIMED_OUT
    assert _state_enums.JOB_STATE_NAMES[jobs_pb2.JOB_STATE_LOST] == "lost"
    assert _state_enums.SANDBOX_STATE_NUMBERS["paused"] == sandbox_pb2.SANDBOX_STATE_PAUSED
    assert _state_enums.SANDBOX_STATE_NAMES[sandbox_pb2.SANDBOX_STATE_KILLED] == "killed"


def test_subsets() -> None:
    assert set(JOB_FINAL_STATES) == set(JOB_STATES) - {"queued", "running"}
    assert set(LIVE_SANDBOX_STATES) == set(SANDBOX_STATES) - {"killed", "failed"}
