"""The template catalog without running a build: names and quotas per team, a build
recorded `building` with its `build` job queued, team isolation, bad input refused with
nothing changed, and templates registered again with a new engine (a server restart).
Real store (SQLite), real engine registry, real layer store; no sandbox."""

from __future__ import annotations

import io
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from corral.config import Settings
from corral.errors import Forbidden, InvalidRequest, NotFound, QuotaExceeded, TemplateNotFound
from corral.images import Base, BuildPlan, BuildStep, Layer, LayerStore
from corral.isolation import Engine
from corral.jobs.runtime import JobRuntime
from corral.jobs.spec import JobSpec
from corral.network.policy import NetworkPolicy
from corral.store import Store, Team
from corral.templates import BuildRequest, TemplateCatalog


def tiny_layer(layers: LayerStore, text: str = "hello") -> Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("etc/greeting")
        info.size, info.mtime = len(text), 1_700_000_000
        tar.addfile(info, io.BytesIO(text.encode()))
    raw.seek(0)
    return layers.import_tar(raw)


def plan(base: Base | None = None) -> BuildPlan:
    run = BuildStep("run", ("/bin/sh", "-c", "echo hi > /hi"), 2)
    return BuildPlan(base or Base("scratch"), (run,))


def jobs_of(store: Store, team_id: str) -> list[str]:
    return [row.id for row in store.list_jobs(team_id)[0]]


@dataclass
class World:
    settings: Settings
    store: Store
    engine: Engine
    runtime: JobRuntime
    a: Team
    b: Team

    @property
    def catalog(self) -> TemplateCatalog:
        return self.runtime.templates


@pytest.fixture
async def world(store_settings: Settings, store: Store) -> AsyncIterator[World]:
    settings = store_settings.with_(template_max_count=3, template_max_bytes=1000)
    engine = Engine(settings)
    # No workers: builds stay queued, so the catalog's side is seen alone.
    runtime = JobRuntime(settings, store, engine, workers=0)
    try:
        yield World(
            settings, store, engine, runtime, store.create_team("alpha"), store.create_team("beta")
        )
    finally:
        await engine.aclose()


async def test_a_build_is_recorded_building_and_its_build_job_queued(world: World) -> None:
    record = await world.catalog.build(world.a.id, BuildRequest("app", plan(), "dockerfile"))
    assert (record.team, record.name, record.state, record.source) == (
        world.a.id,
        "app",
        "building",
        "dockerfile",
    )
    assert record.steps_total == 1 and record.steps_cached == 0 and record.layers == ()
    assert record.build_job_id is not None
    job = world.store.job(record.build_job_id)
    assert job is not None and job.team_id == world.a.id
    assert (job.kind, job.state, job.labels) == ("build", "queued", {"template": "app"})
    spec = JobSpec.from_dict(job.spec)
    assert spec.kind == "build" and spec.build  # the row it builds, read back from the store
    assert await world.catalog.get(world.a.id, "app") == record
    assert [r.name for r in await world.catalog.list(world.a.id)] == ["app"]


async def test_a_build_job_cannot_be_submitted_as_a_job(world: World) -> None:
    with pytest.raises(InvalidRequest, match="corral template build"):
        JobSpec.from_dict({"kind": "build"})
    spec = JobSpec(kind="build", build="t0123")
    with pytest.raises(InvalidRequest, match="corral template build"):
        await world.runtime.queue.submit(world.a, spec)
    assert jobs_of(world.store, world.a.id) == []


async def test_bad_build_requests_are_refused_and_change_nothing(world: World) -> None:
    catalog, team = world.catalog, world.a.id
    bad: list[tuple[BuildRequest, type[Exception], str]] = [
        (BuildRequest("Bad Name", plan(), "dockerfile"), InvalidRequest, "invalid or reserved"),
        (BuildRequest("host", plan(), "dockerfile"), InvalidRequest, "invalid or reserved"),
        (BuildRequest("app", plan(), "tarball"), InvalidRequest, "not a build source"),
        (BuildRequest("app", plan(), "recipe", ready_timeout_s=0), InvalidRequest, "ready_timeout"),
        (
            BuildRequest("app", plan(Base("template", "host")), "recipe"),
            InvalidRequest,
            "no layers",
        ),
        (BuildRequest("app", plan(Base("template", "nope")), "recipe"), NotFound, "no template"),
    ]
    for request, error, message in bad:
        with pytest.raises(error, match=message):
            await catalog.build(team, request)
    assert await catalog.list(team) == []
    assert jobs_of(world.store, team) == []


async def test_quotas_bound_a_teams_names_and_bytes(world: World) -> None:
    catalog, team = world.catalog, world.a.id
    for name in ("one", "two", "three"):
        await catalog.build(team, BuildRequest(name, plan(), "dockerfile"))
    with pytest.raises(QuotaExceeded) as e:
        await catalog.build(team, BuildRequest("four", plan(), "dockerfile"))
    assert "CORRAL_TEMPLATE_MAX_COUNT" in str(e.value) and "quota is 3" in str(e.value)
    # A rebuild of a name it has is no new name; another team has its own count.
    await catalog.build(team, BuildRequest("one", plan(), "dockerfile"))
    await catalog.build(world.b.id, BuildRequest("four", plan(), "dockerfile"))
    assert len(await catalog.list(team)) == 3
    # Bytes: the ready templates' layers; 1000 here.
    big = tiny_layer(catalog.layers, "x" * 1200)
    with pytest.raises(QuotaExceeded) as e:
        catalog.add_layers(world.b.id, "big", [big.digest], source="snapshot")
    assert "CORRAL_TEMPLATE_MAX_BYTES" in str(e.value) and "quota is 1000" in str(e.value)
    assert [r.name for r in await catalog.list(world.b.id)] == ["four"]
    assert "big" not in " ".join(world.engine.templates.names())


async def test_a_teams_templates_are_not_anothers(world: World) -> None:
    catalog = world.catalog
    layer = tiny_layer(catalog.layers)
    record = catalog.add_layers(world.a.id, "base", [layer.digest], source="debian")
    assert record.state == "ready" and record.layers == (layer.digest,)
    engine_name = catalog.resolve(world.a.id, "base")
    assert world.engine.templates.get(engine_name).digests == (layer.digest,)  # type: ignore[union-attr]
    with pytest.raises(TemplateNotFound):
        catalog.resolve(world.b.id, "base")
    with pytest.raises(TemplateNotFound):
        await catalog.get(world.b.id, "base")
    with pytest.raises(TemplateNotFound):
        await catalog.delete(world.b.id, "base")
    assert await catalog.list(world.b.id) == []
    # A job of team b naming it is refused at submit.
    spec = JobSpec.from_dict({"command": ["true"], "template": "base"})
    with pytest.raises(TemplateNotFound):
        await world.runtime.queue.submit(world.b, spec)
    # Team b may have its own "base"; each resolves to its own.
    other = tiny_layer(catalog.layers, "other")
    catalog.add_layers(world.b.id, "base", [other.digest], source="debian")
    assert catalog.resolve(world.b.id, "base") != engine_name


async def test_delete_unregisters_and_releases_the_layers(world: World) -> None:
    catalog = world.catalog
    layer = tiny_layer(catalog.layers)
    catalog.add_layers(world.a.id, "base", [layer.digest], source="debian")
    engine_name = catalog.resolve(world.a.id, "base")
    assert catalog.layers.holders(layer.digest) == [f"template.{engine_name}"]
    await catalog.delete(world.a.id, "base")
    assert engine_name not in world.engine.templates.names()
    assert catalog.layers.holders(layer.digest) == []
    with pytest.raises(TemplateNotFound):
        await catalog.get(world.a.id, "base")


async def test_a_new_ready_build_replaces_the_old_one(world: World) -> None:
    catalog = world.catalog
    first, second = tiny_layer(catalog.layers, "1"), tiny_layer(catalog.layers, "2")
    catalog.add_layers(world.a.id, "base", [first.digest], source="debian")
    old = catalog.resolve(world.a.id, "base")
    catalog.add_layers(world.a.id, "base", [second.digest], source="debian")
    new = catalog.resolve(world.a.id, "base")
    assert new != old and old not in world.engine.templates.names()
    assert catalog.layers.holders(first.digest) == []
    assert (await catalog.get(world.a.id, "base")).layers == (second.digest,)


async def test_templates_are_registered_again_after_a_restart(
    world: World, store_settings: Settings
) -> None:
    catalog = world.catalog
    layer = tiny_layer(catalog.layers)
    catalog.add_layers(world.a.id, "base", [layer.digest], source="debian", env={"A": "1"})
    name = catalog.resolve(world.a.id, "base")
    await world.engine.aclose()
    # A new process: a new engine knows no layer template until the catalog loads.
    engine = Engine(world.settings)
    reopened = Store.open(store_settings)
    try:
        assert engine.templates.names() == ["host"]
        again = TemplateCatalog(world.settings, reopened, engine)
        assert again.load() == 1
        registered = engine.templates.get(name)
        assert registered.digests == (layer.digest,)  # type: ignore[union-attr]
        assert registered.env == {"A": "1"}  # type: ignore[union-attr]
        assert again.resolve(world.a.id, "base") == name
    finally:
        reopened.close()  # (PostgreSQL's connections warn when collected open)
        await engine.aclose()


async def test_a_catalog_without_a_queue_refuses_builds(world: World) -> None:
    """A process with no job queue still resolves; a build there says where builds go."""
    catalog = TemplateCatalog(world.settings, world.store, world.engine)
    with pytest.raises(InvalidRequest, match="no job queue"):
        await catalog.build(world.a.id, BuildRequest("app", plan(), "dockerfile"))
    assert world.store.template_rows(world.a.id) == []


async def test_collect_removes_the_layers_no_template_names(world: World) -> None:
    """A deleted template's layers, and those of builds that ended without a template
    (their cache entries with them), are collected; a ready template's stay."""
    catalog = world.catalog
    kept, dropped, orphan = (tiny_layer(catalog.layers, text) for text in ("k", "d", "o"))
    catalog.add_layers(world.a.id, "kept", [kept.digest], source="debian")
    catalog.add_layers(world.a.id, "dropped", [dropped.digest], source="debian")
    world.store.cache_layer("sha256:" + "0" * 64, orphan.digest)  # a cancelled build's step
    await catalog.delete(world.a.id, "dropped")
    assert {layer.digest for layer in catalog.layers.layers()} == {
        kept.digest,
        dropped.digest,
        orphan.digest,
    }  # within the grace: a build may be about to use them
    assert sorted(catalog.collect(min_age=0)) == sorted([dropped.digest, orphan.digest])
    assert [layer.digest for layer in catalog.layers.layers()] == [kept.digest]
    assert world.store.cache_entries() == {}


async def test_a_build_whose_job_ended_without_it_is_not_left_building(world: World) -> None:
    """Cancelling a build still queued (job cancel) leaves the template cancelled; a
    build job gone (lost worker, deleted) leaves it failed, saying so."""
    record = await world.catalog.build(world.a.id, BuildRequest("app", plan(), "dockerfile"))
    assert record.build_job_id is not None
    world.runtime.queue.cancel(world.a, record.build_job_id, "not now")
    cancelled = await world.catalog.get(world.a.id, "app")
    assert cancelled.state == "cancelled" and "not now" in (cancelled.error or "")
    other = await world.catalog.build(world.a.id, BuildRequest("other", plan(), "dockerfile"))
    assert other.build_job_id is not None
    world.runtime.queue.cancel(world.a, other.build_job_id)
    # Retention deletes the finished job before anyone looked at the template.
    assert world.store.delete_finished_jobs(datetime.now(UTC) + timedelta(seconds=1), 10) == 2
    (listed,) = [r for r in await world.catalog.list(world.a.id) if r.name == "other"]
    assert listed.state == "failed" and "its build job is gone" in (listed.error or "")


async def test_a_builds_network_is_held_to_the_servers_cap(world: World) -> None:
    """RUN steps' network is the server's to allow, per team name (CORRAL_NETWORK_*)."""
    capped = world.settings.with_(network_internet_teams="beta")
    catalog = TemplateCatalog(capped, world.store, world.engine, queue=world.runtime.queue)
    internet = NetworkPolicy.parse("internet")
    with pytest.raises(Forbidden, match="CORRAL_NETWORK_INTERNET_TEAMS"):
        await catalog.build(world.a.id, BuildRequest("app", plan(), "dockerfile", network=internet))
    assert world.store.template_rows(world.a.id) == []
    allowed = await catalog.build(
        world.b.id, BuildRequest("app", plan(), "dockerfile", network=internet)
    )
    assert allowed.state == "building"


async def test_a_version_another_process_replaced_is_let_go_on_next_use(world: World) -> None:
    """Two processes (catalogs with engines of their own) on one store: when one replaces
    a template, the other serves the new version from its next use and releases the old."""
    catalog = world.catalog
    first, second = tiny_layer(catalog.layers, "v1"), tiny_layer(catalog.layers, "v2")
    catalog.add_layers(world.a.id, "base", [first.digest], source="debian")
    engine = Engine(world.settings)
    try:
        elsewhere = TemplateCatalog(world.settings, world.store, engine)
        old = elsewhere.resolve(world.a.id, "base")
        assert f"template.{old}" in catalog.layers.holders(first.digest)
        catalog.add_layers(world.a.id, "base", [second.digest], source="debian")
        new = elsewhere.resolve(world.a.id, "base")
        assert new != old and old not in engine.templates.names()
        assert catalog.layers.holders(first.digest) == []
    finally:
        await engine.aclose()
