"""Template builds end to end: a `build` job on a real queue and worker, RUN steps in real
sandboxes of the Debian base (bootstrapped offline from the local archive), COPY and ADD
from a context tar, the step cache, failures, cancels and the ready check; then sandboxes
started from the result."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.config import Settings
from corral.errors import Forbidden, NotFound, TemplateInUse, TemplateNotFound
from corral.images import (
    Base,
    BuildContext,
    BuildPlan,
    BuildStep,
    ContextFile,
    Layer,
    LayerStore,
    parse_dockerfile,
    parse_recipe,
)
from corral.isolation import Engine, Entrypoint
from corral.jobs.records import JobRecord
from corral.jobs.runtime import JobRuntime
from corral.jobs.spec import JobSpec
from corral.sandboxes.options import CreateOptions
from corral.store import Store, Team
from corral.templates import BuildRequest, TemplateCatalog, TemplateRecord
from tests.conftest import StartManager, private_runtime, require_backend
from tests.kit.debian import MIRROR, base_layer, deb, needs_archive, suite
from tests.kit.oci_images import (
    busybox_rootfs,
    directory,
    layer,
    member,
    skopeo_copy,
    tar_tree,
    write_layout,
)
from tests.kit.polling import until

pytestmark = [pytest.mark.sandbox, *needs_archive("python3")]

BUILD_WAIT = 300.0


@pytest.fixture(scope="module")
def build_settings(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """A runtime of its own (its admission counts only these builds' sandboxes), no warm
    job sandboxes, and the Debian base as a layer of its layer store."""
    require_backend(settings, "namespace")
    with private_runtime(settings) as own:
        # `debian:` bases from the local archive, offline; image archives the tests make.
        archives = str(tmp_path_factory.getbasetemp())
        yield own.with_(job_pool=0, debian_mirror=MIRROR, image_archive_dirs=archives)


@pytest.fixture(scope="module")
def debian(build_settings: Settings) -> Layer:
    return base_layer(LayerStore(build_settings.data_dir / "templates"), ["python3"])


@dataclass
class Builds:
    settings: Settings
    store: Store
    engine: Engine
    runtime: JobRuntime
    team: Team

    @property
    def catalog(self) -> TemplateCatalog:
        return self.runtime.templates

    async def build(self, name: str, request: BuildRequest) -> tuple[TemplateRecord, JobRecord]:
        record = await self.catalog.build(self.team.id, request)
        assert record.build_job_id is not None
        job = await self.runtime.queue.wait_final(record.build_job_id, BUILD_WAIT)
        return await self.catalog.get(self.team.id, name), job

    def logs(self, job_id: str) -> str:
        return b"".join(c.data for c in self.store.job_logs(job_id, 0, 10_000)).decode()

    def events(self, job_id: str) -> list[tuple[str, str]]:
        return [(e.type, e.reason) for e in self.store.job_events(job_id, 0, 10_000)]


@pytest.fixture
async def builds(
    build_settings: Settings, store_settings: Settings, debian: Layer, tmp_path: Path
) -> AsyncIterator[Builds]:
    store = Store.open(store_settings)
    engine = Engine(build_settings)
    runtime = JobRuntime(build_settings, store, engine, workers=2)
    await runtime.start()
    team = store.create_team("builders")
    runtime.templates.add_layers(team.id, "debian", [debian.digest], source="debian")
    try:
        yield Builds(build_settings, store, engine, runtime, team)
    finally:
        await runtime.aclose()
        await engine.aclose()
        store.close()


def context_tar(root: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".")
    return raw.getvalue()


def make_context(root: Path) -> Path:
    (root / "app").mkdir(parents=True)
    (root / "app" / "hello.txt").write_text("hello from the context\n")
    (root / "app" / "data").mkdir()
    (root / "app" / "data" / "n.txt").write_text("42\n")
    (root / "tool.sh").write_text("#!/bin/sh\necho tool ran\n")
    inner = root / "inner"
    inner.mkdir()
    (inner / "extracted.txt").write_text("from the archive\n")
    with tarfile.open(root / "bundle.tar.gz", "w:gz") as tar:
        tar.add(inner, arcname=".")
    return root


DOCKERFILE = """\
# syntax=docker/dockerfile:1
ARG FLAVOUR=plain
FROM debian
ARG FLAVOUR
ARG COLOUR=blue
ENV GREETING="hello world" MODE=${FLAVOUR}
LABEL org.example.purpose=test
WORKDIR /srv/app
COPY app/ ./
COPY --chmod=0755 tool.sh /usr/local/bin/tool
ADD bundle.tar.gz /opt/bundle/
RUN echo "$GREETING $COLOUR" > built.txt && rm /etc/issue && tool > /srv/tool.out
RUN id -un > /srv/build-user && echo app:x:1500:1500::/srv/app:/bin/sh >> /etc/passwd \
    && echo app:x:1500: >> /etc/group && chown 1500:1500 /srv/app
USER app
RUN id -un > whoami.txt
EXPOSE 8080/tcp
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=1s CMD test -f /tmp/started
CMD ["sh", "-c", "touch /tmp/started; sleep 600"]
"""


async def test_a_dockerfile_with_every_instruction_builds_a_template_sandboxes_start_from(
    builds: Builds, tmp_path: Path
) -> None:
    context = make_context(tmp_path / "ctx")
    plan = parse_dockerfile(DOCKERFILE, BuildContext(context))
    request = BuildRequest("app", plan, "dockerfile", context=context_tar(context))
    record, job = await builds.build("app", request)
    assert job.state == "succeeded", (job.state_reason, builds.logs(job.id))
    assert record.state == "ready" and record.error is None
    assert record.env == {"GREETING": "hello world", "MODE": "plain"}
    assert (record.workdir, record.user) == ("/srv/app", "app")
    assert record.start_cmd == "touch /tmp/started; sleep 600"
    assert record.ready_cmd == "test -f /tmp/started"
    assert record.steps_total == len(plan.steps) and record.steps_cached == 0
    # The Debian base, then one layer per COPY, ADD and RUN.
    assert len(record.layers) == 7 and record.size_bytes > 0
    events = builds.events(job.id)
    assert ("step_start", f"step 2/{len(plan.steps)} ARG COLOUR blue") in events
    assert any(kind == "step_end" and "ready check" in reason for kind, reason in events)

    engine_name = builds.catalog.resolve(builds.team.id, "app")
    box = await builds.engine.create(template=engine_name, isolation="namespace")
    try:
        script = (
            "pwd; cat built.txt hello.txt data/n.txt /opt/bundle/extracted.txt /srv/tool.out;"
            " echo $GREETING/$MODE; test -e /etc/issue || echo issue-gone;"
            " test -x /usr/local/bin/tool && echo tool-executable; tool;"
            # RUN as root until USER app; the sandboxes run as the last USER.
            " cat /srv/build-user whoami.txt; id -un; echo x >> /etc/passwd || echo not-root"
        )
        ran = await box.run(["sh", "-c", script])
        assert ran.exit_code == 0, ran.stderr
        assert ran.stdout.decode().splitlines() == [
            "/srv/app",
            "hello world blue",
            "hello from the context",
            "42",
            "from the archive",
            "tool ran",
            "hello world/plain",
            "issue-gone",
            "tool-executable",
            "tool ran",
            "root",
            "app",
            "app",
            "not-root",
        ]
        # A live sandbox holds the template: it is not deleted under it.
        with pytest.raises(TemplateInUse, match=box.id):
            await builds.catalog.delete(builds.team.id, "app")
    finally:
        await box.destroy()
    await builds.catalog.delete(builds.team.id, "app")
    assert engine_name not in builds.engine.templates.names()


RECIPE = """\
template: debian
steps:
  - run: echo one > /one
  - run: echo two > /two
  - env: {STAGE: "3"}
  - run: echo three-$STAGE > /three
  - run: cat /one /two /three > /all
ready: test -s /all
"""


async def test_a_rebuild_after_editing_a_step_reuses_the_steps_before_it(
    builds: Builds,
) -> None:
    first, job = await builds.build("steps", BuildRequest("steps", parse_recipe(RECIPE), "recipe"))
    assert first.state == "ready", (job.state_reason, builds.logs(job.id))
    assert first.steps_cached == 0
    # The same recipe again: every layer step from the cache, no RUN runs.
    again, job = await builds.build("steps", BuildRequest("steps", parse_recipe(RECIPE), "recipe"))
    assert again.state == "ready" and again.steps_cached == 4
    assert again.layers == first.layers
    assert sum(kind == "cached" for kind, _ in builds.events(job.id)) == 4
    # Editing the third RUN (step 4) runs it and what follows; 1-2 hit.
    edited = RECIPE.replace("echo three-$STAGE", "echo THREE-$STAGE")
    third, job = await builds.build("steps", BuildRequest("steps", parse_recipe(edited), "recipe"))
    assert third.state == "ready" and third.steps_cached == 2, builds.logs(job.id)
    assert third.layers[:3] == first.layers[:3] and third.layers[3:] != first.layers[3:]
    box = await builds.engine.create(
        template=builds.catalog.resolve(builds.team.id, "steps"), isolation="namespace"
    )
    try:
        ran = await box.run(["cat", "/all"])
        assert ran.stdout.decode().split() == ["one", "two", "THREE-3"]
    finally:
        await box.destroy()
    # Only the newest build is kept; the older ones' engine templates are gone.
    assert len(builds.store.template_rows(builds.team.id, "steps")) == 1


async def test_a_failing_step_fails_the_build_with_its_name_and_log_tail(
    builds: Builds,
) -> None:
    recipe = (
        "template: debian\nsteps:\n  - run: echo fine\n  - run: echo broken-output >&2; exit 3\n"
    )
    record, job = await builds.build(
        "broken", BuildRequest("broken", parse_recipe(recipe), "recipe")
    )
    assert job.state == "failed" and record.state == "failed"
    assert record.error is not None
    assert "step 2/2 RUN" in record.error and "exited with code 3" in record.error
    assert "broken-output" in record.error
    assert "broken-output" in builds.logs(job.id)
    with pytest.raises(TemplateNotFound, match="failed"):
        builds.catalog.resolve(builds.team.id, "broken")


async def test_a_failing_ready_check_fails_the_build_and_a_rebuild_keeps_the_old_one(
    builds: Builds,
) -> None:
    good = "template: debian\nsteps:\n  - run: echo v1 > /version\nready: test -f /version\n"
    first, job = await builds.build("svc", BuildRequest("svc", parse_recipe(good), "recipe"))
    assert first.state == "ready", builds.logs(job.id)
    serving = builds.catalog.resolve(builds.team.id, "svc")
    bad = "template: debian\nsteps:\n  - run: echo v2 > /version\nready: test -f /nowhere\n"
    second, job = await builds.build(
        "svc", BuildRequest("svc", parse_recipe(bad), "recipe", ready_timeout_s=2)
    )
    assert second.state == "failed" and job.state == "failed"
    assert second.error is not None and "ready check did not pass within 2 s" in second.error
    # The old version still serves.
    assert builds.catalog.resolve(builds.team.id, "svc") == serving


async def test_a_cancelled_build_leaves_no_template(builds: Builds) -> None:
    """Cancelled while its RUN step runs: the step's command and sandbox are gone, the
    template is `cancelled` with no layers."""
    recipe = "template: debian\nsteps:\n  - run: echo started; sleep 600\n"
    record = await builds.catalog.build(
        builds.team.id, BuildRequest("slow", parse_recipe(recipe), "recipe")
    )
    assert record.build_job_id is not None
    job_id = record.build_job_id

    def started() -> bool:
        return "started" in builds.logs(job_id)

    await until(started, "the build's RUN step to print", timeout=60)
    builds.runtime.queue.cancel(builds.team, job_id, "changed my mind")
    job = await builds.runtime.queue.wait_final(job_id, 60)
    assert job.state == "canceled"
    cancelled = await builds.catalog.get(builds.team.id, "slow")
    assert cancelled.state == "cancelled" and cancelled.layers == ()
    assert not [n for n in builds.engine.templates.names() if n.endswith("-build")]
    assert not builds.engine.sandboxes


async def test_a_local_image_archive_outside_the_operators_dirs_is_refused(
    builds: Builds, tmp_path: Path
) -> None:
    """An API caller names paths of the server's disk in FROM: only the directories of
    CORRAL_IMAGE_ARCHIVE_DIRS may be read, and a refusal does not say whether a path
    exists; nothing is recorded."""
    refs = ("docker-archive:/etc/shadow", "oci:/var/lib/x:1", "oci-archive:relative.tar")
    for ref in refs:
        plan = parse_dockerfile(f"FROM {ref}\n", BuildContext(tmp_path))
        request = BuildRequest("outside", plan, "dockerfile")
        with pytest.raises(Forbidden, match="CORRAL_IMAGE_ARCHIVE_DIRS"):
            await builds.catalog.build(builds.team.id, request)
    assert builds.store.template_rows(builds.team.id, "outside") == []


async def test_an_oci_image_base_from_an_oci_archive(builds: Builds, tmp_path: Path) -> None:
    """FROM an oci-archive made in the test (Debian's busybox-static, two layers, the
    second deleting a file): the image's layers, then the COPY's; its config's Env and
    WorkingDir under the Dockerfile's. Busybox has no Python for the guest agent, so the
    template is checked with a one-shot sandbox (its command in place of the agent)."""
    rootfs = busybox_rootfs(deb("busybox-static"), tmp_path / "rootfs")
    top = layer(directory("etc"), member("etc/.wh.motd"), member("etc/top", b"corral\n"))
    config = {"Env": ["PATH=/bin:/usr/bin", "GREETING=hello"], "WorkingDir": "/srv"}
    layout = write_layout(tmp_path / "image", [tar_tree(rootfs), top], config)
    archive = tmp_path / "image.oci.tar"
    skopeo_copy(f"oci:{layout}:1", f"oci-archive:{archive}")
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "greeting.txt").write_text("copied\n")
    text = f"FROM oci-archive:{archive}\nCOPY greeting.txt /etc/greeting\nENV EXTRA=1\n"
    plan = parse_dockerfile(text, BuildContext(context))
    request = BuildRequest("bb", plan, "dockerfile", context=context_tar(context))
    record, job = await builds.build("bb", request)
    assert record.state == "ready", (job.state_reason, builds.logs(job.id))
    assert len(record.layers) == 3 and record.workdir == "/srv"
    assert record.env == {"PATH": "/bin:/usr/bin", "GREETING": "hello", "EXTRA": "1"}
    assert any(kind == "pulled" for kind, _ in builds.events(job.id))
    script = "cat /etc/top /etc/greeting; ls /etc; echo $GREETING$EXTRA"
    box = await builds.engine.create(
        template=builds.catalog.resolve(builds.team.id, "bb"),
        isolation="namespace",
        entrypoint=Entrypoint(["/bin/sh", "-c", script]),
    )
    try:
        assert box.entry is not None
        ran = await box.entry.collect()
    finally:
        await box.destroy()
    assert ran.exit_code == 0, ran.stderr
    lines = ran.stdout.decode().split()
    assert lines[:2] == ["corral", "copied"] and "motd" not in lines and lines[-1] == "hello1"


async def test_a_step_cannot_make_the_host_write_through_its_symlinks(
    builds: Builds, tmp_path: Path
) -> None:
    """A RUN that deletes a file (a whiteout in its upper dir) and plants a symlink where
    an OCI deletion marker would go (the snapshot makes markers in its tar, never on the
    host), and a COPY whose second entry would go through a
    symlink its first made: both fail, the host path they aim at stays untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    planted = f"rm /etc/issue; ln -s {outside}/created /etc/.wh.issue"
    recipe = f"template: debian\nsteps:\n  - run: {planted}\n"
    record, _ = await builds.build("plant", BuildRequest("plant", parse_recipe(recipe), "recipe"))
    assert list(outside.iterdir()) == []  # whatever the layer makes of the name
    assert record.state in ("ready", "failed")

    context = tmp_path / "ctx"
    context.mkdir()
    (context / "evil").write_text("evil\n")
    digest = "sha256:" + hashlib.sha256(b"evil\n").hexdigest()
    files = (
        ContextFile("link", "/x", "symlink", 0o777, "", target=str(outside)),
        ContextFile("evil", "/x/evil", "file", 0o644, digest),
    )
    plan = BuildPlan(Base("template", "debian"), (BuildStep("copy", ("/x",), 2, files=files),))
    record, _ = await builds.build(
        "through", BuildRequest("through", plan, "recipe", context=context_tar(context))
    )
    assert list(outside.iterdir()) == []
    assert record.state == "failed" and record.error is not None
    assert "through a symlink" in record.error


async def test_sandboxes_and_jobs_start_from_their_teams_template_by_name(
    builds: Builds, managers: StartManager
) -> None:
    """`template=NAME` through the sandbox manager and the job queue resolves in the
    caller's team; another team's is not found; a live sandbox's template is not deleted."""
    recipe = "template: debian\nsteps:\n  - run: echo built > /built\n"
    record, job = await builds.build("named", BuildRequest("named", parse_recipe(recipe), "recipe"))
    assert record.state == "ready", builds.logs(job.id)
    # The manager of a server: the engine and the store its catalog serves.
    manager = await managers(builds.settings, engine=builds.engine)
    manager.resolve_template = builds.catalog.resolve
    other = builds.store.create_team("others")
    with pytest.raises(TemplateNotFound):
        await manager.create(other, CreateOptions(template="named"))
    sandbox = await manager.create(builds.team, CreateOptions(template="named"))
    try:
        assert sandbox.template == "named"
        with pytest.raises(TemplateInUse, match=sandbox.id):
            await builds.catalog.delete(builds.team.id, "named")
        # A snapshot of it is a template of the team (another team cannot take one).
        builds.catalog.manager = manager
        engine_box = builds.engine.sandboxes[sandbox.id]
        assert (await engine_box.run(["sh", "-c", "echo mine > /mine"])).exit_code == 0
        with pytest.raises(NotFound):
            await builds.catalog.snapshot(other.id, sandbox.id, "snap")
        snap = await builds.catalog.snapshot(builds.team.id, sandbox.id, "snap")
        assert snap.state == "ready" and snap.source == "snapshot" and len(snap.layers) == 3
    finally:
        await manager.kill(builds.team, sandbox.id)
    from_snap = await manager.create(builds.team, CreateOptions(template="snap"))
    try:
        ran = await builds.engine.sandboxes[from_snap.id].run(["cat", "/built", "/mine"])
        assert ran.stdout == b"built\nmine\n", ran.stderr
    finally:
        await manager.kill(builds.team, from_snap.id)
    # A job of the team: its worker starts its sandbox from the template.
    spec = JobSpec.from_dict({"command": ["cat", "/built"], "template": "named"})
    submitted, _, _ = await builds.runtime.queue.submit(builds.team, spec)
    done = await builds.runtime.queue.wait_final(submitted.id, BUILD_WAIT)
    assert done.state == "succeeded", done.state_reason
    assert builds.logs(submitted.id) == "built\n"
    with pytest.raises(TemplateNotFound):
        await builds.runtime.queue.submit(other, spec)
    await builds.catalog.delete(builds.team.id, "named")


async def test_a_debian_base_is_bootstrapped_once_and_cached(builds: Builds) -> None:
    """`debian:` in a recipe bootstraps from CORRAL_DEBIAN_MIRROR (the local archive here,
    offline: 20-60 s); a second build of the same base takes it from the build cache."""
    recipe = (
        f"debian: {{suite: {suite()}, packages: [python3]}}\n"
        "steps:\n  - run: python3 -c 'print(6 * 7)' > /answer\nready: test -s /answer\n"
    )
    first, job = await builds.build("deb", BuildRequest("deb", parse_recipe(recipe), "recipe"))
    assert first.state == "ready", (job.state_reason, builds.logs(job.id))
    assert any(kind == "bootstrap" for kind, _ in builds.events(job.id))
    second, job = await builds.build("deb", BuildRequest("deb", parse_recipe(recipe), "recipe"))
    assert second.state == "ready" and second.layers == first.layers
    assert ("cached", f"Debian {suite()}: cached") in builds.events(job.id)
    assert not any(kind == "bootstrap" for kind, _ in builds.events(job.id))
    box = await builds.engine.create(
        template=builds.catalog.resolve(builds.team.id, "deb"), isolation="namespace"
    )
    try:
        assert (await box.run(["cat", "/answer"])).stdout == b"42\n"
    finally:
        await box.destroy()
