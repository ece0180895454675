"""`corral worker`: a process that runs jobs from a shared store, without the API.

With `--metrics-port` (CORRAL_METRICS_PORT) it serves its Prometheus metrics (its job
attempts, callbacks, warm pool, store calls, CPU and memory) on that port, without a key.

SIGINT or SIGTERM stops claiming, stops the running jobs and queues them again (they
run again from the start elsewhere); a second signal exits at once, and the jobs are
requeued when their leases expire. SIGHUP reloads the configuration (`corral.reload`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from corral.config import Settings
from corral.instruments import MetricsListener
from corral.isolation import Engine
from corral.jobs.runtime import JobRuntime
from corral.reload import Reloader
from corral.store import Store

log = logging.getLogger("corral.jobs")
EXIT_FORCED = 130


async def _run(settings: Settings, store: Store, stop: asyncio.Event) -> None:
    # Before any sandbox: a port in use is refused while there is nothing to undo.
    metrics = None
    if settings.metrics_port:
        metrics = MetricsListener(settings.metrics_host, settings.metrics_port)
        url = f"http://{settings.metrics_host}:{metrics.port}/metrics"
        log.info("metrics served", extra={"url": url})
    engine = Engine(settings)  # reaps what dead processes left, then again periodically
    engine.start_reaper()
    runtime = JobRuntime(settings, store, engine)
    try:
        await runtime.start()
        await stop.wait()
        log.info("stopping: running jobs go back to the queue")
    finally:
        await runtime.aclose()
        await engine.aclose()
        if metrics is not None:
            metrics.close()


def run_worker(settings: Settings, url: str | None = None, reloader: Reloader | None = None) -> int:
    """Run a worker until a signal (SIGHUP: `reloader` reloads); the process's exit code."""
    store = Store.open(settings, url)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("forced exit: running jobs are requeued when their leases expire")
                logging.shutdown()
                os._exit(EXIT_FORCED)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        if reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, reloader.reload)
        await _run(settings, store, stop)

    try:
        asyncio.run(main())
    finally:
        store.close()
    return 0
