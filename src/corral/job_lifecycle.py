"""The life of a job: which states follow which, and the rules that choose the next one.

                           submit
                             │
        ┌─────────────────▶ queued ◀──────────────────────────┐
        │                    │  ▲                             │
        │              claim │  │ retry (attempts left: the   │
        │                    │  │ backoff), release (shutdown │
        │                    ▼  │ or no room), lease expiry   │
        │                  running                            │
        │                    │                                │ retry by request
        │   end, cancel, lease expiry (lost or canceled)      │
        │                    ▼                                │
        │   succeeded · failed · timed_out · canceled · lost ─┘
        │                                   ▲
        └──── cancel of a queued job ───────┘

Named rules (the queue, the worker, the runner and the store ask these; none decides
inline):

- `MOVES` / `may_move`: the transitions that exist (the diagram above).
- `is_final`: a final job changes only by a retry by request (`may_retry_by_request`).
- `retries` / `retry_delay`: a failed or timed-out attempt is retried while the job has
  attempts left, after an exponential backoff from the spec's first delay.
- `cancel_action`: a queued job is canceled at once; a running one is marked, and its
  worker stops it (at once in its process, else at its next heartbeat); a final one stays.
- `heartbeat_stop`: why a worker must stop a running attempt: its lease is gone, or a
  cancel waits.
- `on_lease_expiry`: a job whose worker stopped heartbeating is canceled when a cancel
  waits, lost when this is its `MAX_LOST`-th lost worker, else queued again; a lost
  worker does not spend one of the job's retries.
- `on_release`: an attempt given back (its worker shuts down, or the host had no room
  for its sandbox) is queued again unspent, or canceled when a cancel waits.
- `unspent`: a requeue that is not the job's fault (a lost worker, a shutdown) allows one
  more attempt, so it costs the job none of its retries.
- `room_wait`: a job the host had no room for is claimed again after a wait that doubles
  up to a maximum.

The module imports only the state names (`corral.states`), so the store (which writes
these moves) and the services (which choose them) may both use it; it sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from corral.states import JOB_FINAL_STATES, JobState

# A job is marked lost when its third worker is lost (the README says "after 3 lost
# workers it is `lost`"); lost workers do not spend its retries.
MAX_LOST = 3
MAX_BACKOFF_SECONDS = 3600.0
# A job whose sandbox the host has no room for yet goes back to the queue, unspent, and is
# claimed again this long after, doubled at each wait up to the maximum: room comes back
# as other sandboxes end, and a worker must not spin on a full host meanwhile.
ROOM_WAIT_SECONDS = 1.0
MAX_ROOM_WAIT_SECONDS = 10.0
# The attempt states whose attempt is retried while the job has attempts left.
RETRIED: tuple[JobState, ...] = ("failed", "timed_out")
# Why a running attempt must stop early: a cancel waits, its lease is gone, or its
# worker shuts down.
StopReason = Literal["cancel", "lost", "shutdown"]

MOVES: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "canceled"}),
    "running": frozenset({"queued", *JOB_FINAL_STATES}),
    **{final: frozenset({"queued"}) for final in JOB_FINAL_STATES},
}


def may_move(state: str, to: str) -> bool:
    """Whether a job in `state` may move to `to` (the diagram's arrows)."""
    return to in MOVES.get(state, frozenset())


def is_final(state: str) -> bool:
    return state in JOB_FINAL_STATES


def may_retry_by_request(state: str) -> bool:
    """Only a finished job can be queued again by request (a live one is canceled first)."""
    return is_final(state)


def retries(state: str, attempt: int, max_attempts: int) -> bool:
    """Whether an attempt that ended in `state` is retried: a failure or timeout, while
    the job has attempts left."""
    return state in RETRIED and attempt < max_attempts


def retry_delay(first_delay: float | None, attempt: int) -> float:
    """Exponential backoff: the spec's first delay (1 s by default), doubled per retry."""
    return float(min(MAX_BACKOFF_SECONDS, (first_delay or 1.0) * 2 ** (attempt - 1)))


def cancel_action(state: str, cancel_pending: bool) -> Literal["cancel", "mark", "none"]:
    """What a cancel does to a job in `state`: "cancel" it now (queued), "mark" it for its
    worker to stop (running, not yet marked), or "none" (final, or marked already)."""
    if state == "queued":
        return "cancel"
    if state == "running" and not cancel_pending:
        return "mark"
    return "none"


def heartbeat_stop(
    state: str | None, worker: str | None, me: str, cancel_pending: bool
) -> StopReason | None:
    """Why the worker `me` must stop its attempt of a job now in `state` run by `worker`
    (None: the job is gone): "lost" when it is no longer this worker's running job,
    "cancel" when a cancel waits, else None (it runs on)."""
    if state != "running" or worker != me:
        return "lost"
    if cancel_pending:
        return "cancel"
    return None


@dataclass(frozen=True)
class Move:
    """A state a job moves to and why (its `state_reason` and event text)."""

    state: JobState
    reason: str

    @property
    def final(self) -> bool:
        return is_final(self.state)


def on_lease_expiry(
    worker: str | None, attempt: int, lost_count: int, cancel_reason: str | None, max_lost: int
) -> Move:
    """A running job whose worker stopped heartbeating; `lost_count` counts this worker."""
    gone = f"worker {worker} stopped heartbeating (attempt {attempt})"
    if cancel_reason is not None:
        return Move("canceled", f"canceled: {cancel_reason}; {gone}")
    if lost_count >= max_lost:
        return Move("lost", f"lost: {gone}; {lost_count} workers lost, giving up")
    return Move("queued", f"requeued: {gone}")


def on_release(cancel_reason: str | None, reason: str) -> Move:
    """A running attempt given back to the queue, unspent, for `reason`."""
    if cancel_reason is not None:
        return Move("canceled", f"canceled: {cancel_reason}")
    return Move("queued", reason)


def unspent(max_attempts: int) -> int:
    """The job's attempt budget after a requeue that was not its fault: the attempt it
    lost is given back."""
    return max_attempts + 1


def room_wait(waits: int) -> float:
    """Seconds before a job the host had no room for is claimed again, after `waits`
    earlier waits."""
    return float(min(MAX_ROOM_WAIT_SECONDS, ROOM_WAIT_SECONDS * 2 ** min(waits, 16)))
