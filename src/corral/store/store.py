"""The store: one object for every table, opened once per process."""

from __future__ import annotations

from corral.store.census import CensusStore
from corral.store.e2b import E2bStore
from corral.store.jobs import JobStore
from corral.store.metrics import MetricStore
from corral.store.retention import RetentionStore
from corral.store.sandboxes import SandboxStore
from corral.store.teams import TeamStore
from corral.store.templates import TemplateStore
from corral.store.vms import VmStore
from corral.store.volumes import VolumeStore


class Store(
    TeamStore,
    SandboxStore,
    MetricStore,
    JobStore,
    VolumeStore,
    TemplateStore,
    VmStore,
    E2bStore,
    RetentionStore,
    CensusStore,
):
    """Corral's durable state: teams and keys, sandboxes and their events, metrics, jobs,
    volumes, templates and the build cache, vms, E2B's sandbox rows; old rows pruned.

    store = Store.open(settings)            # SQLite at <data_dir>/corral.db, migrated
    store = Store.open(settings, url="postgresql+psycopg://…")

    Calls are synchronous: each is one short transaction (~0.1 ms on SQLite).
    """
