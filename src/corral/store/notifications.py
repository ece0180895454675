"""Wake-ups from the store's writers to waiters in other processes.

    store.notify(conn, JOBS_QUEUED)             # in a write transaction: sent on commit
    stop = store.notifications.subscribe(on)    # on(channel, payload) in this event loop
    stop = store.notifications.subscribe(on, own={CALLBACKS_DUE})  # this process's too
    stop()

A write names what it changed inside its transaction, so a wake-up goes out only with a
commit, never for a rolled-back change, and never before a reader could see the change.

- PostgreSQL: each change is a `NOTIFY` in the writing transaction (PostgreSQL delivers
  it on commit, to every listening session); each process has one `LISTEN` connection,
  outside the pool, on a thread, that hands what it hears to the subscribers' event loops.
- SQLite has no such channel: waiters in other processes keep polling the store
  (`cross_process` is False, and their poll stays short).

Waiters in the process that made a change are mostly woken by that process's own code at
once (`corral.jobs.queue.JobSignals`), so a process skips its own notifications here,
except on the channels a subscriber names as `own`: those reach it from this process's
commits too, on both databases, once the transaction has committed (the callback outbox:
any of a process's writes may owe a delivery, and no code of its own is at hand to say so).

Nothing committed is missed: while the listening connection is down (a restart of the
server, `pg_terminate_backend`), notifications are lost, so once it listens again every
subscriber gets `RECHECK` and reads again whatever it waits on. The same goes for the
first `LISTEN`: what was committed between a waiter's read and it is read again. Waiters
still poll, slowly, as a safety net (`SAFETY_POLL_SECONDS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass

import sqlalchemy as sa

log = logging.getLogger("corral.store")

# The one PostgreSQL channel; what changed is in the payload: "<origin> <channel> <arg>".
PG_CHANNEL = "corral"
# Given to every subscriber after the listening connection (re)connects: re-read it all.
RECHECK = "recheck"
# How long waiters sleep between reads of the store when other processes' changes wake
# them (PostgreSQL): only a net for what no notification could say (a job whose
# `run_after` comes, a lost connection not yet noticed).
SAFETY_POLL_SECONDS = 5.0
_PENDING = "corral_notifications"
_RECONNECT_FIRST = 0.1
_RECONNECT_MAX = 5.0

Subscriber = Callable[[str, str], None]


@dataclass(frozen=True)
class _Subscription:
    loop: asyncio.AbstractEventLoop
    callback: Subscriber
    own: frozenset[str]  # channels on which this process's own commits reach it too


class Notifications:
    """One process's end of the store's wake-ups (see the module docstring)."""

    def __init__(self, url: sa.URL) -> None:
        self.cross_process = url.get_backend_name() == "postgresql"
        # psycopg's own URL: SQLAlchemy's without the "+driver".
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._origin = secrets.token_hex(6)
        self._subscribers: dict[int, _Subscription] = {}
        # Every subscriber's `own` channels: what a transaction keeps for after its commit.
        self._own: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        # Set while the LISTEN connection is up (tests wait on it); its server process id.
        self.listening = threading.Event()
        self.backend_pid: int | None = None
        self.reconnect_delay = _RECONNECT_FIRST

    # -- writers --------------------------------------------------------------------------

    def notify(self, conn: sa.Connection, channel: str, payload: str = "") -> None:
        """Say `channel` (with `payload`) when `conn`'s transaction commits."""
        if self.cross_process or channel in self._own:
            conn.info.setdefault(_PENDING, {})[(channel, payload)] = None

    def send(self, conn: sa.Connection) -> None:
        """Issue the transaction's notifications to other processes, once each, in one
        statement (its last before the COMMIT)."""
        pending = conn.info.get(_PENDING)
        if pending and self.cross_process:
            # On psycopg itself: in a pipelined write (the store's writes on PostgreSQL)
            # its result is never read, so it goes with the COMMIT.
            payloads = [f"{self._origin} {ch} {arg}" for ch, arg in pending]
            conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (PG_CHANNEL, payloads)
            )

    def committed(self, conn: sa.Connection) -> None:
        """The transaction committed: hand what it said on `own` channels to this
        process's subscribers of them."""
        pending = conn.info.pop(_PENDING, None)
        for channel, payload in pending or ():
            if channel in self._own:
                self._fan_out(channel, payload, own=True)

    @staticmethod
    def discard(conn: sa.Connection) -> None:
        """Forget what a failed transaction would have said."""
        conn.info.pop(_PENDING, None)

    # -- waiters --------------------------------------------------------------------------

    def subscribe(self, callback: Subscriber, *, own: Collection[str] = ()) -> Callable[[], None]:
        """Call `callback(channel, payload)` in the running event loop for each change
        other processes commit (and `RECHECK`), and for those this process commits on the
        channels `own`; returns the call that stops it."""
        subscription = _Subscription(asyncio.get_running_loop(), callback, frozenset(own))
        key = id(subscription)
        with self._lock:
            self._subscribers[key] = subscription
            self._own = self._own | subscription.own
            if self.cross_process and self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=self._listen, name="corral-listen", daemon=True
                )
                self._thread.start()

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)
                self._own = frozenset().union(*(s.own for s in self._subscribers.values()))

        return unsubscribe

    def close(self) -> None:
        self._closed.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)

    def _fan_out(self, channel: str, payload: str, *, own: bool = False) -> None:
        with self._lock:
            subscribers = list(self._subscribers.values())
        for s in subscribers:
            if own and channel not in s.own:
                continue
            with contextlib.suppress(RuntimeError):  # its loop has closed
                s.loop.call_soon_threadsafe(s.callback, channel, payload)

    def _listen(self) -> None:
        """The LISTEN connection's thread: (re)connect, tell subscribers to re-read, then
        hand on what other processes say until closed."""
        import psycopg

        delay = self.reconnect_delay
        while not self._closed.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {PG_CHANNEL}")
                    self.backend_pid = conn.info.backend_pid
                    self.listening.set()
                    self._fan_out(RECHECK, "")
                    delay = self.reconnect_delay
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._heard(note.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                if self._closed.is_set():
                    break
                log.warning(
                    "the store's LISTEN connection failed; connecting again",
                    extra={"error": str(exc), "delay": delay},
                )
                self._closed.wait(delay)
                delay = min(max(delay, _RECONNECT_FIRST) * 2, _RECONNECT_MAX)
        self.listening.clear()

    def _heard(self, text: str) -> None:
        origin, _, rest = text.partition(" ")
        if origin == self._origin:  # this process's own change: woken already
            return
        channel, _, payload = rest.partition(" ")
        self._fan_out(channel, payload)
