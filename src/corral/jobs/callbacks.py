"""Signed POSTs of a job's events to its callback URL, with retries.

The store writes each delivery into the `job_callbacks` outbox in the same transaction
as its event; `CallbackDispatcher` claims due rows, POSTs them and records the outcome.
It runs a pass when the store says deliveries are owed (`CALLBACKS_DUE`: from this
process's commits, and on PostgreSQL from every other's), when the first pending one
comes due later (a retry's backoff, a claim's hold running out), and otherwise polls:
every 0.2 s on SQLite, whose other processes cannot wake it, and every 5 s on PostgreSQL,
only as a safety net.
Delivery is at least once: a row whose POST was cut short (the process stopped, the
reply never came) stays pending and is sent again once its claim's hold runs out, so a
receiver dedupes on `X-Corral-Delivery` and orders on the payload's `seq`.

Each request carries `X-Corral-Signature: t=<unix time>,v1=<hex HMAC-SHA256>` over
`"<t>." + body`, keyed with the job's callback secret (`corral.jobs.signing`, which also
holds the receiver's `verify`). No API key or token is ever sent: the secret proves the
sender.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from corral import __version__, instruments
from corral.errors import CallbackRefused
from corral.jobs.callback_policy import CallbackPolicy, CallbackTarget, destination
from corral.jobs.signing import sign
from corral.store.callback_outbox import CALLBACK_ATTEMPTS, CALLBACKS_DUE, CallbackRow
from corral.store.jobs import JobStore
from corral.store.notifications import RECHECK, SAFETY_POLL_SECONDS

__all__ = ["INTERNAL_FAILED", "REFUSED", "CallbackDispatcher"]

log = logging.getLogger("corral.jobs.callbacks")


# What the tenant sees (the job's callback last_error) for a refused URL, and for any
# failure to reach an address the operator allowed: whether an internal host:port
# answered, and how, would map the server's network for them. The log has the detail.
REFUSED = "refused by the server's callback policy"
INTERNAL_FAILED = "delivery failed (the server's log has the details)"

# How many due jobs a pass looks at to find ones whose limits have room.
_SCAN = 10_000
# Between passes when nothing wakes the dispatcher and no delivery comes due, where other
# processes' deliveries cannot wake it (SQLite).
POLL_SECONDS = 0.2


class _Failed(Exception):
    """A POST that got no acknowledgement; the message says how."""


def _body(payload: Mapping[str, Any]) -> bytes:
    # Compact and key-sorted: a row sent again is the same bytes.
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


class CallbackDispatcher:
    """Delivers due outbox rows in the background of a server or worker process.

        dispatcher = CallbackDispatcher(store, CallbackPolicy.parse(settings.callback_allow))
        dispatcher.start()         # wakes when the store says deliveries are owed
        await dispatcher.aclose()

    Each job's rows go one after another, in outbox (event) order; jobs go at once, up to
    `concurrency` in all, `per_destination` to one host:port and `per_team` of one team,
    so a receiver that never answers holds only its own slots (each POST is bounded by
    `connect_timeout` and `timeout`) and the others' deliveries pass it by.

    Every POST goes to an address the policy checked just before (see callback_policy):
    a refused URL is not contacted, and the tenant learns only that it was refused.

    Critical events (`done`, `error`, `step_end`) are retried with exponential backoff
    up to CALLBACK_ATTEMPTS times; the others are tried once.
    """

    def __init__(
        self,
        store: JobStore,
        policy: CallbackPolicy | None = None,
        *,
        interval: float | None = None,
        connect_timeout: float = 5.0,
        timeout: float = 10.0,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
        batch: int = 32,
        hold: float = 60.0,
        concurrency: int = 64,
        per_destination: int = 4,
        per_team: int = 16,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if hold <= timeout:
            # A POST still waiting for its reply when the hold runs out would be claimed
            # and sent again by another dispatcher meanwhile.
            raise ValueError(f"hold ({hold}s) must be longer than timeout ({timeout}s)")
        if min(concurrency, per_destination, per_team) < 1:
            raise ValueError(
                "callback concurrency limits must be at least 1: check CORRAL_CALLBACK_"
                "CONCURRENCY, CORRAL_CALLBACK_PER_DESTINATION and CORRAL_CALLBACK_PER_TEAM"
            )
        self.store = store
        self.policy = policy or CallbackPolicy()
        # None: a short poll where other processes cannot wake it, else a safety net.
        if interval is None:
            interval = SAFETY_POLL_SECONDS if store.notifications.cross_process else POLL_SECONDS
        self._interval = interval
        self._timeout = timeout
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._batch = batch
        self._hold = hold
        self._concurrency = concurrency
        self._per_destination = per_destination
        self._per_team = per_team
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            # A transport of our own: no proxy from the environment, so the POST goes to
            # the address checked (SSL_CERT_FILE still names the CAs to trust). Each POST
            # connects to that address with the URL's host in Host and the TLS server
            # name, so no connection is kept: one pooled by address could carry a host's
            # POST over a TLS session verified for another.
            transport=httpx.AsyncHTTPTransport(
                verify=verify,
                limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=0),
            ),
            follow_redirects=False,  # a redirect is not an acknowledgement
            headers={"User-Agent": f"corral/{__version__}"},
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._flights: dict[str, asyncio.Task[int]] = {}  # job id -> its deliveries
        self._busy: Counter[str] = Counter()  # "team <id>" / "host:port" -> flights

    def start(self) -> None:
        if self._client.is_closed:
            raise RuntimeError("a closed CallbackDispatcher cannot start again")
        if self._task is None:
            # Before the first pass: what is owed after it wakes the next.
            self._unsubscribe = self.store.notifications.subscribe(
                self._heard, own=(CALLBACKS_DUE,)
            )
            self._task = asyncio.create_task(self._run(), name="corral-callbacks")

    def wake(self) -> None:
        """Run a pass now rather than at the next tick."""
        self._wake.set()

    def _heard(self, channel: str, _payload: str) -> None:
        # RECHECK: the LISTEN connection (re)connected, what was said meanwhile unheard.
        if channel in (CALLBACKS_DUE, RECHECK):
            self._wake.set()

    async def aclose(self) -> None:
        """Stop the loop. POSTs in flight are cut short: their rows stay pending and are
        sent again once their hold runs out."""
        task, self._task = self._task, None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks = [t for t in (task, *self._flights.values()) if t is not None]
        for t in tasks:
            t.cancel()
        try:
            # Their own cancellations come back as results; the caller's, if it is
            # cancelled too, is raised.
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await self._client.aclose()

    async def deliver_due(self) -> int:
        """One pass: claim what is due and may go now, POST it, record each outcome.
        Returns how many rows were attempted."""
        started = self._start_due()
        return sum(await asyncio.gather(*started))

    # -- passes ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            wait = self._interval
            try:
                began = datetime.now(UTC)
                self._start_due()
                # A row due later is not announced: sleep until then at most. (One due by
                # `began` and not started waits for its job's flight, or for a slot.)
                due = self.store.next_callback_due(after=began)
                if due is not None:
                    wait = min(wait, max(0.0, (due - datetime.now(UTC)).total_seconds()))
            except Exception:
                log.exception("callback pass failed; trying again next tick")
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _start_due(self) -> list[asyncio.Task[int]]:
        """Start the due jobs whose limits have room; each runs until its rows are done.
        A job over a limit is not claimed, so it waits without holding anything."""
        free = self._concurrency - len(self._flights)
        if free <= 0:
            return []
        chosen: dict[str, tuple[str, str]] = {}
        busy = Counter(self._busy)
        for due in self.store.due_callback_jobs(_SCAN, exclude=list(self._flights)):
            keys = (f"team {due.team_id}", destination(due.callback_url or ""))
            if busy[keys[0]] >= self._per_team or busy[keys[1]] >= self._per_destination:
                continue
            busy.update(keys)
            chosen[due.job_id] = keys
            if len(chosen) == free:
                break
        if not chosen:
            return []
        rows = self.store.due_callbacks(self._batch, self._hold, job_ids=list(chosen))
        # No POST may start so late that it could outlive the claim's hold.
        deadline = asyncio.get_running_loop().time() + self._hold - self._timeout
        by_job: dict[str, list[CallbackRow]] = {}
        for row in rows:
            by_job.setdefault(row.job_id, []).append(row)
        started = []
        for job_id, job_rows in by_job.items():  # a job missing here: another took it
            keys = chosen[job_id]
            self._busy.update(keys)
            task = asyncio.create_task(
                self._deliver_job(job_id, job_rows, deadline), name=f"corral-callbacks-{job_id}"
            )
            self._flights[job_id] = task
            task.add_done_callback(functools.partial(self._landed, job_id, keys))
            started.append(task)
        return started

    def _landed(self, job_id: str, keys: tuple[str, ...], _: asyncio.Task[int]) -> None:
        self._flights.pop(job_id, None)
        self._busy.subtract(keys)
        self._wake.set()  # a slot is free: what waited for it goes now

    # -- one job --------------------------------------------------------------------------

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
        """POST one row; None when the receiver acknowledged it, else why not, as the
        tenant may see it: nothing about refused or internal hosts (the log has it)."""
        extra = {"job_id": row.job_id, "delivery": row.id, "url": url}
        target: CallbackTarget | None = None
        try:
            # httpx's timeouts bound the connect and each read; this the whole exchange
            # (resolving included), so a receiver trickling its reply cannot hold the
            # POST past the claim's hold.
            async with asyncio.timeout(self._timeout):
                target = await self.policy.check(url)
                await self._send(row, target, secret)
                return None
        except CallbackRefused as exc:
            log.warning("callback refused by the policy: %s", exc, extra=extra)
            return REFUSED
        except TimeoutError:
            detail = f"Timeout: no reply within {self._timeout:g}s"
        except _Failed as exc:
            detail = str(exc)
        if target is None or not target.public:
            log.info("callback to an internal address failed: %s", detail, extra=extra)
            return INTERNAL_FAILED
        return detail

    async def _send(self, row: CallbackRow, target: CallbackTarget, secret: str) -> None:
        """POST to the target's addresses in turn until one connects; _Failed unless the
        receiver acknowledged it."""
        body = _body(row.payload)
        headers = {
            "Content-Type": "application/json",
            "X-Corral-Signature": sign(secret, body, int(time.time())),
            "X-Corral-Event": str(row.payload.get("type", "")),
            "X-Corral-Job": row.job_id,
            "X-Corral-Delivery": str(row.id),
        }
        url = httpx.URL(target.url)
        headers["Host"] = url.netloc.decode("ascii")
        extensions = {} if target.literal else {"sni_hostname": target.host}
        error: Exception | None = None
        for address in target.addresses:
            request = self._client.build_request(
                "POST",
                url.copy_with(host=str(address), port=target.port),
                content=body,
                headers=headers,
                extensions=extensions,
            )
            try:
                # Only the status is read: a receiver's body, however large, is not.
                reply = await self._client.send(request, stream=True)
                await reply.aclose()
            except httpx.ConnectError as exc:
                error = exc  # the next address may answer
                continue
            except httpx.HTTPError as exc:
                error = exc
                break
            if reply.is_success:
                return
            raise _Failed(f"HTTP {reply.status_code}")
        assert error is not None
        raise _Failed(f"{type(error).__name__}: {str(error) or 'no detail'}")

    def _record(self, row: CallbackRow, error: str | None, *, final: bool = False) -> None:
        extra = {
            "job_id": row.job_id,
            "delivery": row.id,
            "event": row.payload.get("type"),
            "attempt": row.attempts + 1,
        }
        if error is None:
            self.store.callback_done(row.id, error=None, retry_at=None)
            instruments.CALLBACK_DELIVERIES.labels(outcome="delivered").inc()
            log.debug("callback delivered", extra=extra)
            return
        retry_at = None
        if not final and row.critical and row.attempts + 1 < CALLBACK_ATTEMPTS:
            delay = min(self._max_backoff, self._backoff * 2**row.attempts)
            retry_at = datetime.now(UTC) + timedelta(seconds=delay)
        self.store.callback_done(row.id, error=error, retry_at=retry_at)
        outcome = "refused" if error == REFUSED else "retry" if retry_at else "failed"
        instruments.CALLBACK_DELIVERIES.labels(outcome=outcome).inc()
        if retry_at is None:
            log.warning("callback failed for good: %s", error, extra=extra)
        else:
            log.info("callback failed, will retry: %s", error, extra=extra)
