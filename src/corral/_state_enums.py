"""The state names of `corral.states` as the API's enum numbers, both ways.

The server writes states into messages and the SDK reads them back with these maps. A
name is its enum value's name without the prefix, lower-cased (`timed_out` is
`JOB_STATE_TIMED_OUT`), so the maps are derived, not listed: a state the proto lacks
fails at import, and a test checks the proto has no state the names lack.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar, cast

from corral.states import JOB_STATES, SANDBOX_STATES, TEMPLATE_STATES
from corral.v1 import jobs_pb2, sandbox_pb2, templates_pb2

E = TypeVar("E", sandbox_pb2.SandboxState, jobs_pb2.JobState, templates_pb2.TemplateState)


def _numbers(enum: type[E], prefix: str, names: Iterable[str]) -> dict[str, E]:
    # `enum` is the generated EnumTypeWrapper; its values are plain ints typed as `E`.
    return {name: cast(E, enum.Value(f"{prefix}_{name.upper()}")) for name in names}


SANDBOX_STATE_NUMBERS = _numbers(sandbox_pb2.SandboxState, "SANDBOX_STATE", SANDBOX_STATES)
SANDBOX_STATE_NAMES = {number: name for name, number in SANDBOX_STATE_NUMBERS.items()}
JOB_STATE_NUMBERS = _numbers(jobs_pb2.JobState, "JOB_STATE", JOB_STATES)
JOB_STATE_NAMES = {number: name for name, number in JOB_STATE_NUMBERS.items()}
TEMPLATE_STATE_NUMBERS = _numbers(templates_pb2.TemplateState, "TEMPLATE_STATE", TEMPLATE_STATES)
TEMPLATE_STATE_NAMES = {number: name for name, number in TEMPLATE_STATE_NUMBERS.items()}
