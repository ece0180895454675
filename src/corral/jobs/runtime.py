"""What runs jobs in one process: a worker pool, lease expiry, callback delivery and the
retention sweep.

`corral server` runs one beside the API (its `queue` serves JobService); `corral worker`
runs one alone against the same store.
"""

from __future__ import annotations

from collections.abc import Callable

from corral.config import Settings
from corral.isolation import Engine
from corral.jobs.callback_policy import CallbackPolicy
from corral.jobs.callbacks import CallbackDispatcher
from corral.jobs.queue import JobQueue, JobSignals
from corral.jobs.retention import Retention
from corral.jobs.worker import Worker
from corral.store import Store
from corral.templates import TemplateCatalog


class JobRuntime:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        engine: Engine,
        *,
        workers: int | None = None,
        lease: float | None = None,
    ) -> None:
        self.store = store
        self.signals = JobSignals()
        self._unlisten: Callable[[], None] | None = None
        self.retention = Retention.from_settings(store, settings)
        # One policy for both ends: what Submit accepts and where deliveries may go.
        policy = CallbackPolicy.parse(settings.callback_allow)
        self.callbacks = CallbackDispatcher(
            store,
            policy,
            concurrency=settings.callback_concurrency,
            per_destination=settings.callback_per_destination,
            per_team=settings.callback_per_team,
        )
        self.worker = Worker(
            settings,
            store,
            engine=engine,
            signals=self.signals,
            concurrency=workers,
            lease=lease,
        )
        # With no workers here, any isolation and size is accepted for workers elsewhere.
        here = self.worker.concurrency > 0
        self.queue = JobQueue(
            store,
            settings,
            signals=self.signals,
            isolations=self.worker.tiers if here else None,
            callback_policy=policy,
            capacity=engine.memory_capacity if here else None,
        )

        # The team's templates: `template=NAME` of jobs resolves there, builds run there.
        self.templates = TemplateCatalog(settings, store, engine, queue=self.queue)
        self.queue.templates = self.templates
        self.worker.templates = self.templates

    async def start(self) -> None:
        # Before the worker's first claim: a job queued elsewhere after it wakes it.
        self._unlisten = self.signals.listen(self.store.notifications)
        self.templates.load()
        await self.worker.start()
        self.callbacks.start()
        self.retention.start()

    async def aclose(self) -> None:
        await self.retention.aclose()
        await self.worker.aclose()
        await self.callbacks.aclose()
        if self._unlisten is not None:
            self._unlisten()
