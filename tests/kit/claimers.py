"""Workers racing for the job queue: threads on two stores that share one database file."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from corral.config import Settings
from corral.store import Store
from corral.store.job_rows import JobRow

# On PostgreSQL a claim skips a team another claimer holds (SKIP LOCKED): one empty claim
# does not yet mean that nothing is left.
EMPTY_CLAIMS = 5


def race_claims(
    store: Store,
    settings: Settings,
    isolations: Sequence[str],
    *,
    threads: int = 4,
    limit: int = 2,
    lease: float = 60,
) -> dict[str, list[JobRow]]:
    """What each of `threads` claimers (workers w0, w1, ...) claimed, `limit` jobs a claim,
    until claims came back empty `EMPTY_CLAIMS` times in a row. They alternate between
    `store` and a second store that `settings` opens on the same database (two workers'
    processes) and start together; a thread's error is raised here."""
    other = Store.open(settings)
    claims: dict[str, list[JobRow]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def claimer(name: str, on: Store) -> None:
        got: list[JobRow] = []
        try:
            start.wait()
            empty = 0
            while empty < EMPTY_CLAIMS:
                rows = on.claim_jobs(name, isolations, limit, lease)
                got.extend(rows)
                empty = 0 if rows else empty + 1
                # A worker between claims: the others get their turn.
                time.sleep(0.001 if rows else 0.02)
        except BaseException as exc:
            errors.append(exc)
        claims[name] = got

    racing = [
        threading.Thread(target=claimer, args=(f"w{i}", store if i % 2 == 0 else other))
        for i in range(threads)
    ]
    try:
        for thread in racing:
            thread.start()
        for thread in racing:
            thread.join(60)
    finally:
        other.close()
    if errors:
        raise errors[0]
    return claims
