"""Signed POSTs of a job's events to its callback URL, with retries.

The store writes each delivery into the `job_callbacks` outbox in the same transaction
as its event; `CallbackDispatcher` claims due rows, POSTs them and records the outcome.
Delivery is at least once: a row whose POST was cut short (the process stopped, the
reply never came) stays pending and is sent again once its claim's hold runs out, so a
receiver dedupes on `X-Corral-Delivery` and orders on the payload's `seq`.

Each request carries `X-Corral-Signature: t=<unix time>,v1=<hex HMAC-SHA256>` over
`"<t>." + body`, keyed with the job's callback secret; `verify` checks it on the
receiving side. No API key or token is ever sent: the secret proves the sender.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from corral import __version__
from corral.store.jobs import CALLBACK_ATTEMPTS, CallbackRow, JobStore

__all__ = ["CallbackDispatcher", "sign", "verify"]

log = logging.getLogger("corral.jobs.callbacks")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The `X-Corral-Signature` value for `body` sent at `timestamp` (Unix seconds)."""
    return f"t={timestamp},v1={_digest(secret, body, timestamp)}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance: float = 300, now: float | None = None
) -> bool:
    """Whether `header` is a signature of `body` by `secret`, made within `tolerance`
    seconds of `now` (default: the current time). A receiver checks every POST:

        body = request.body()                       # the raw bytes, before parsing
        header = request.headers.get("X-Corral-Signature", "")
        if not verify(secret, header, body):
            return Response(status=400)             # forged, tampered with or replayed
        event = json.loads(body)                    # dedupe on X-Corral-Delivery

    Several `v1=` entries are allowed (any one matching is enough); a malformed header
    is simply not a valid signature.
    """
    timestamp: int | None = None
    signatures = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    current = time.time() if now is None else now
    # A signature from too far in the past (or future) may be a captured request replayed.
    if abs(current - timestamp) > tolerance:
        return False
    expected = _digest(secret, body, timestamp).encode()
    # Every candidate is compared, so timing does not reveal which (if any) matched; as
    # bytes, because compare_digest refuses str with non-ASCII characters.
    matches = [hmac.compare_digest(expected, s.encode()) for s in signatures]
    return any(matches)


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def _body(payload: Mapping[str, Any]) -> bytes:
    # Compact and key-sorted: a row sent again is the same bytes.
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class CallbackDispatcher:
    """Delivers due outbox rows in the background of a server or worker process.

        dispatcher = CallbackDispatcher(store)
        dispatcher.start()
        dispatcher.wake()          # a job ended: send its `done` now, not next tick
        await dispatcher.aclose()

    Critical events (`done`, `error`, `step_end`) are retried with exponential backoff
    up to CALLBACK_ATTEMPTS times; the others are tried once.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        interval: float = 0.2,
        timeout: float = 10.0,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        batch: int = 32,
        hold: float = 60.0,
    ) -> None:
        if hold <= timeout:
            # A POST still waiting for its reply when the hold runs out would be claimed
            # and sent again by another dispatcher meanwhile.
            raise ValueError(f"hold ({hold}s) must be longer than timeout ({timeout}s)")
        self.store = store
        self._interval = interval
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._batch = batch
        self._hold = hold
        self._client = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,  # a redirect is not an acknowledgement
            headers={"User-Agent": f"corral/{__version__}"},
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._client.is_closed:
            raise RuntimeError("a closed CallbackDispatcher cannot start again")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="corral-callbacks")

    def wake(self) -> None:
        """Run a pass now rather than at the next tick."""
        self._wake.set()

    async def aclose(self) -> None:
        """Stop the loop. POSTs in flight are cut short: their rows stay pending and are
        sent again once their hold runs out."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                # Our own cancellation of the task, unless the caller is cancelled too.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        await self._client.aclose()

    async def deliver_due(self) -> int:
        """One pass: claim due rows, POST them, record each outcome. Returns how many
        rows were attempted."""
        rows = self.store.due_callbacks(self._batch, self._hold)
        if not rows:
            return 0
        # No POST may start so late that it could outlive the claim's hold.
        deadline = asyncio.get_running_loop().time() + self._hold - self._timeout
        # Rows of one job go one after another, in outbox (event) order; jobs in parallel.
        by_job: dict[str, list[CallbackRow]] = {}
        for row in rows:
            by_job.setdefault(row.job_id, []).append(row)
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._deliver_job(job_id, job_rows, deadline))
                for job_id, job_rows in by_job.items()
            ]
        return sum(t.result() for t in tasks)

    # -- inside a pass ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                attempted = await self.deliver_due()
            except Exception:
                log.exception("callback pass failed; trying again next tick")
                attempted = 0
            if attempted >= self._batch:
                await asyncio.sleep(0)  # more may be due: go again, but let others run
                continue
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _deliver_job(self, job_id: str, rows: list[CallbackRow], deadline: float) -> int:
        loop = asyncio.get_running_loop()
        try:
            job = self.store.job(job_id)
        except Exception:
            log.exception("callback job lookup failed", extra={"job_id": job_id})
            return 0  # the rows stay held, then pending: tried again after the hold
        attempted = 0
        for row in rows:
            if loop.time() > deadline:
                break  # left held; the next claim after the hold sends them
            try:
                if job is None:
                    self._record(row, "job is gone", final=True)
                elif not job.callback_url or not job.callback_secret:
                    self._record(row, "job has no callback URL or secret", final=True)
                else:
                    error = await self._post(row, job.callback_url, job.callback_secret)
                    self._record(row, error)
                attempted += 1
            except Exception:
                log.exception(
                    "callback delivery failed unexpectedly",
                    extra={"job_id": job_id, "delivery": row.id},
                )
        return attempted

    async def _post(self, row: CallbackRow, url: str, secret: str) -> str | None:
        """POST one row; None when the receiver acknowledged it, else why not."""
        body = _body(row.payload)
        headers = {
            "Content-Type": "application/json",
            "X-Corral-Signature": sign(secret, body, int(time.time())),
            "X-Corral-Event": str(row.payload.get("type", "")),
            "X-Corral-Job": row.job_id,
            "X-Corral-Delivery": str(row.id),
        }
        try:
            # httpx's timeout bounds each read; this bounds the whole exchange, so a
            # receiver trickling its reply cannot hold the POST past the claim's hold.
            async with asyncio.timeout(self._timeout):
                reply = await self._client.post(url, content=body, headers=headers)
        except TimeoutError:
            return f"Timeout: no reply within {self._timeout:g}s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {str(exc) or 'no detail'}"
        if reply.is_success:
            return None
        return f"HTTP {reply.status_code}"

    def _record(self, row: CallbackRow, error: str | None, *, final: bool = False) -> None:
        extra = {
            "job_id": row.job_id,
            "delivery": row.id,
            "event": row.payload.get("type"),
            "attempt": row.attempts + 1,
        }
        if error is None:
            self.store.callback_done(row.id, error=None, retry_at=None)
            log.debug("callback delivered", extra=extra)
            return
        retry_at = None
        if not final and row.critical and row.attempts + 1 < CALLBACK_ATTEMPTS:
            delay = min(self._max_backoff, self._backoff * 2**row.attempts)
            retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        self.store.callback_done(row.id, error=error, retry_at=retry_at)
        if retry_at is None:
            log.warning("callback failed for good: %s", error, extra=extra)
        else:
            log.info("callback failed, will retry: %s", error, extra=extra)
