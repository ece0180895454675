"""The state names of sandboxes and jobs, defined once.

The store's check constraints, the services, and (through `corral._state_enums`, their
numbers in the API's enums) the server and the SDK all use these tuples. The module
imports nothing, so any layer may use it, the SDK included. How a job moves between its
states is `corral.lifecycle`.
"""

from __future__ import annotations

from typing import Literal

SandboxState = Literal["creating", "running", "paused", "killed", "failed"]
SANDBOX_STATES: tuple[SandboxState, ...] = ("creating", "running", "paused", "killed", "failed")
# A sandbox in one of these may still hold processes (and counts against quotas).
LIVE_SANDBOX_STATES: tuple[SandboxState, ...] = ("creating", "running", "paused")

JobState = Literal["queued", "running", "succeeded", "failed", "timed_out", "canceled", "lost"]
JOB_STATES: tuple[JobState, ...] = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "canceled",
    "lost",
)
# A job in one of these is done: nothing changes it again but a retry by request.
JOB_FINAL_STATES: tuple[JobState, ...] = ("succeeded", "failed", "timed_out", "canceled", "lost")

TemplateState = Literal["building", "ready", "failed", "cancelled"]
TEMPLATE_STATES: tuple[TemplateState, ...] = ("building", "ready", "failed", "cancelled")
