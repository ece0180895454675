"""TemplateService end to end: a real server (its Debian mirror the tests' local archive),
builds through the SDK (a Dockerfile, E2B's builder) and the CLI (progress in a pipe, exit
codes, logs --follow, cancel), sandboxes started from what they made, list/get/rm (refused
while a sandbox uses the template), bad input refused with nothing made, and teams that
never see each other's templates."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.client import BuildLog, Sandbox, Template
from corral.config import Settings
from corral.errors import BuildFailed, NotFound
from corral.limits import BUILD_CONTEXT_MAX_BYTES
from tests.conftest import DATABASES, LiveServer, database_url, opts, require_backend
from tests.kit.build_cache import BuildCache, build_server
from tests.kit.debian import needs_archive, suite
from tests.kit.polling import wait_until

BUILD_TIMEOUT = 600

# The module's first test waits for its `base` fixture's Debian bootstrap: minutes on a
# busy machine, past the suite's default 120 s.
pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.timeout(BUILD_TIMEOUT),
    *needs_archive("python3"),
]


@pytest.fixture(scope="module", params=DATABASES)
def tserver(
    settings: Settings, build_cache: BuildCache, request: pytest.FixtureRequest
) -> Iterator[LiveServer]:
    """On SQLite, and on PostgreSQL (templates and their builds are the store's); the second
    builds nothing the first did (`build_cache`)."""
    require_backend(settings, "namespace")
    with build_server(settings, "templates-api", database_url(request), build_cache) as live:
        yield live


@pytest.fixture(scope="module")
def base(tserver: LiveServer, build_cache: BuildCache) -> str:
    """A Debian base with python3, built through the API (a `debian` source): bootstrapped
    by the module's first server, from the cache it saved on the next."""
    said = f"Debian {suite()}: cached" if build_cache.entries else "bootstrapping Debian"
    seen: list[BuildLog] = []
    info = Template.build(
        Template().from_debian(suite(), ["python3"]),
        "base",
        on_build_logs=seen.append,
        **opts(tserver),
    )
    assert info.state == "ready" and info.source == "debian" and info.layers
    assert any(said in str(e) for e in seen if e.event), seen
    build_cache.save(tserver)
    return "base"


def cli(
    server: LiveServer, *args: str, timeout: float = BUILD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return server.corral(*args, timeout=timeout)


def names(server: LiveServer, key: str | None = None) -> set[str]:
    env = {"CORRAL_API_KEY": key} if key else {}
    listed = server.corral("template", "list", "-o", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    return {t["name"] for t in json.loads(listed.stdout)}


def test_sdk_builds_a_dockerfile_and_sandboxes_start_from_it(
    tserver: LiveServer, base: str, tmp_path: Path
) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "hello.txt").write_text("hello from the context\n")
    (tmp_path / "Dockerfile").write_text(
        f"FROM {base}\n"
        "COPY app/ /app/\n"
        'RUN python3 -c \'open("/built.txt", "w").write("built\\n")\' && echo ran-the-step\n'
        "ENV MODE=prod\n"
        "WORKDIR /app\n"
    )
    seen: list[BuildLog] = []
    template = Template().from_dockerfile(tmp_path / "Dockerfile")
    info = Template.build(template, "dock", on_build_logs=seen.append, **opts(tserver))
    assert info.state == "ready" and info.source == "dockerfile"
    assert info.env.get("MODE") == "prod" and info.workdir == "/app"
    # Progress events (step i/N …) and the RUN step's output, labelled with its step.
    events = [str(e) for e in seen if e.event]
    assert "step 2/4 RUN /bin/sh -c python3 -c" in "\n".join(events), events
    output = [e for e in seen if e.chunk and b"ran-the-step" in e.chunk.data]
    assert output and output[0].label.startswith("step 2/4 RUN"), output

    with Sandbox.create("dock", **opts(tserver)) as sbx:
        ran = sbx.commands.run("cat /built.txt /app/hello.txt; echo $MODE")
        assert ran.stdout.split() == ["built", "hello", "from", "the", "context", "prod"]


def test_sdk_builds_with_e2b_builder_vocabulary(
    tserver: LiveServer, base: str, tmp_path: Path
) -> None:
    (tmp_path / "f.txt").write_text("copied\n")
    template = (
        Template(file_context_path=tmp_path)
        .from_template(base)
        .run_cmd(["echo e2b > /e2b.txt", "echo second >> /e2b.txt"])
        .copy("f.txt", "/opt/f.txt")
        .set_envs({"FROM_E2B": "yes"})
        .set_workdir("/opt")
        .set_ready_cmd("test -f /e2b.txt")
    )
    info = Template.build(template, "e2b", **opts(tserver))
    assert info.state == "ready" and info.source == "e2b" and info.ready_cmd == "test -f /e2b.txt"
    with Sandbox.create("e2b", **opts(tserver)) as sbx:
        ran = sbx.commands.run("cat /e2b.txt f.txt; echo $FROM_E2B")
        assert ran.stdout.split() == ["e2b", "second", "copied", "yes"]

    # A start command runs in every sandbox of the template, which is handed out once
    # its ready check passes (E2B's set_start_cmd; a Dockerfile's CMD and HEALTHCHECK).
    serving = (
        Template()
        .from_template(base)
        .set_start_cmd("echo $$ > /tmp/started; exec sleep 600", "test -s /tmp/started")
    )
    info = Template.build(serving, "serving", **opts(tserver))
    with Sandbox.create("serving", **opts(tserver)) as sbx:
        assert sbx.commands.run("test -s /tmp/started").exit_code == 0  # ready at create
        assert [p.tag for p in sbx.commands.list()] == ["start"]
        snap = sbx.snapshot("serving-snap")  # its sandboxes start the same way
    assert (snap.start_cmd, snap.ready_cmd) == (info.start_cmd, info.ready_cmd) != ("", "")
    with Sandbox.create("serving-snap", **opts(tserver)) as sbx:
        assert [p.tag for p in sbx.commands.list()] == ["start"]

    # A failing ready check fails the build once its timeout passes: BuildFailed names it.
    failing = Template().from_template(base).set_ready_cmd("exit 7")
    with pytest.raises(BuildFailed, match="ready check did not pass within 2 s"):
        Template.build(failing, "never-ready", ready_timeout=2, **opts(tserver))
    assert Template.get("never-ready", **opts(tserver)).state == "failed"


def test_cli_build_progress_exit_codes_and_logs(
    tserver: LiveServer, base: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN echo first-line && echo second-line\n")
    done = cli(
        tserver, "template", "build", "cli-ok", "-f", str(tmp_path / "Dockerfile"), str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "\r" not in done.stdout and "\033" not in done.stdout  # plain lines in a pipe
    assert any(line.startswith("step 1/1 RUN") for line in lines), lines
    assert any(
        line.startswith("[step 1/1 RUN") and line.endswith("] second-line") for line in lines
    ), lines
    assert "ready" in done.stderr

    # A rebuild takes the step from the cache and says so.
    again = cli(
        tserver, "template", "build", "cli-ok", "-f", str(tmp_path / "Dockerfile"), str(tmp_path)
    )
    assert again.returncode == 0, again.stderr
    assert any(line.endswith(": cached") for line in again.stdout.splitlines()), again.stdout
    assert (
        json.loads(cli(tserver, "template", "get", "cli-ok", "-o", "json").stdout)["steps_cached"]
        == 1
    )

    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN echo boom-before-failing && exit 3\n")
    failed = cli(
        tserver, "template", "build", "cli-bad", "-f", str(tmp_path / "Dockerfile"), str(tmp_path)
    )
    assert failed.returncode == 1, failed.stderr
    assert "cli-bad failed" in failed.stderr and "boom-before-failing" in failed.stderr

    logs = cli(tserver, "template", "logs", "cli-bad", "--follow")
    assert logs.returncode == 1 and "boom-before-failing" in logs.stdout


def test_logs_follow_streams_a_running_build_to_its_end(
    tserver: LiveServer, base: str, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN echo early && sleep 2 && echo late\n")
    started = cli(
        tserver, "template", "build", "slow", "-f", str(tmp_path / "Dockerfile"), str(tmp_path),
        "--no-follow", "-o", "json",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert json.loads(started.stdout)["state"] == "building"
    follow = cli(tserver, "template", "logs", "slow", "--follow")
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.index("early") < follow.stdout.index("late")
    # Resuming after the first chunks shows only what came after them.
    rest = cli(tserver, "template", "logs", "slow", "--offset", "1", "-o", "json")
    chunks = [json.loads(line) for line in rest.stdout.splitlines()]
    assert all(c["chunk"] is None or c["chunk"]["seq"] >= 1 for c in chunks)


def test_list_get_rm_and_rm_refused_while_in_use(tserver: LiveServer, base: str) -> None:
    info = Template.build(Template().from_template(base).run_cmd("true"), "in-use", **opts(tserver))
    assert "in-use" in names(tserver)
    got = cli(tserver, "template", "get", "in-use")
    assert got.returncode == 0 and "ready" in got.stdout and info.build_job_id in got.stdout

    sbx = Sandbox.create("in-use", **opts(tserver))
    try:
        refused = cli(tserver, "template", "rm", "in-use")
        assert refused.returncode == 8, refused.stderr
        assert sbx.sandbox_id in refused.stderr and "kill" in refused.stderr
        assert "in-use" in names(tserver)
    finally:
        sbx.kill()
    removed = cli(tserver, "template", "rm", "in-use")
    assert removed.returncode == 0, removed.stderr
    assert "in-use" not in names(tserver)
    assert cli(tserver, "template", "get", "in-use").returncode == 4


def test_bad_input_is_refused_and_nothing_is_made(
    tserver: LiveServer, base: str, tmp_path: Path
) -> None:
    before = names(tserver)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(f"FROM {base}\nFROBNICATE everything\n")
    done = cli(tserver, "template", "build", "bad-instr", "-f", str(dockerfile), str(tmp_path))
    assert done.returncode == 2 and "line 2" in done.stderr and "FROBNICATE" in done.stderr

    dockerfile.write_text(f"FROM {base}\nCOPY big.bin /\n")
    (tmp_path / "big.bin").write_bytes(b"\0" * (BUILD_CONTEXT_MAX_BYTES + 1))
    done = cli(tserver, "template", "build", "too-big", "-f", str(dockerfile), str(tmp_path))
    assert done.returncode == 2 and "6 MiB" in done.stderr
    (tmp_path / "big.bin").unlink()

    dockerfile.write_text(f"FROM {base}\nRUN true\n")
    done = cli(tserver, "template", "build", "Bad Name!", "-f", str(dockerfile), str(tmp_path))
    assert done.returncode == 2 and "template name" in done.stderr

    done = cli(tserver, "template", "build", "two", "-f", str(dockerfile), "--image", "r/x")
    assert done.returncode == 2 and "once" in done.stderr

    # The server pulls images from its own network: not from what only it can reach
    # (refused before any connection: literal addresses are not even resolved).
    for image in ("127.0.0.1:5000/a/b:1", "10.1.2.3/a/b:1", "[fd00::1]:443/a:1"):
        done = cli(tserver, "template", "build", "internal", "--image", image)
        assert done.returncode == 2 and "CORRAL_REGISTRY_ALLOW" in done.stderr, done.stderr
    dockerfile.write_text("FROM 169.254.169.254/latest/meta:1\n")
    done = cli(tserver, "template", "build", "meta", "-f", str(dockerfile), str(tmp_path))
    assert done.returncode == 2 and "link-local" in done.stderr, done.stderr
    assert names(tserver) == before


def test_another_team_cannot_see_or_use_it(tserver: LiveServer, base: str) -> None:
    other = tserver.new_team(f"other-{secrets.token_hex(3)}")
    assert base in names(tserver)
    assert names(tserver, other) == set()
    for args in (("get", base), ("rm", base), ("logs", base), ("cancel", base)):
        done = tserver.corral("template", *args, CORRAL_API_KEY=other)
        assert done.returncode == 4, (args, done.stderr)
    with pytest.raises(NotFound):
        Sandbox.create(base, server=tserver.url, api_key=other)
    assert base in names(tserver)


def test_cancel_stops_a_running_build(tserver: LiveServer, base: str, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN echo sleeping && sleep 600\n")
    started = cli(
        tserver, "template", "build", "cancelled", "-f", str(tmp_path / "Dockerfile"),
        str(tmp_path), "--no-follow",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr

    def sleeping() -> bool:
        logs = Template.logs("cancelled", **opts(tserver))
        return any(e.chunk is not None and b"sleeping" in e.chunk.data for e in logs)

    wait_until(sleeping, "the build's RUN step to start", timeout=120)
    done = cli(tserver, "template", "cancel", "cancelled", "-o", "json", timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "cancelled"
    follow = cli(tserver, "template", "logs", "cancelled", "--follow", timeout=60)
    assert follow.returncode == 125, follow.stderr
    with pytest.raises(NotFound):
        Sandbox.create("cancelled", **opts(tserver))


def test_a_sandbox_snapshot_is_a_template(tserver: LiveServer, base: str) -> None:
    with Sandbox.create(base, **opts(tserver)) as sbx:
        wrote = sbx.commands.run("echo kept > /opt/kept.txt")
        assert wrote.exit_code == 0, wrote.stderr
        done = cli(tserver, "sandbox", "snapshot", sbx.sandbox_id, "--name", "snap", "-o", "json")
        assert done.returncode == 0, done.stderr
        made = json.loads(done.stdout)
        assert made["state"] == "ready" and made["source"] == "snapshot"
        # The SDK's twin: a second snapshot after another write.
        sbx.commands.run("echo more > /opt/more.txt")
        info = sbx.snapshot("snap-sdk")
        assert info.state == "ready" and len(info.layers) == len(made["layers"])
        # Flattened (wrenn's FlattenRootfs): one layer, the same tree, a deletion kept.
        assert sbx.commands.run("rm /etc/debian_version").exit_code == 0
        done = cli(
            tserver, "sandbox", "snapshot", sbx.sandbox_id, "--name", "snap-flat", "--flatten",
            "-o", "json", timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["layers"]) == 1
    for name in ("snap-sdk", "snap-flat"):
        with Sandbox.create(name, **opts(tserver)) as sbx:
            assert sbx.commands.run("cat /opt/kept.txt /opt/more.txt").stdout.split() == [
                "kept",
                "more",
            ]
            gone = sbx.commands.run("test -e /etc/debian_version").exit_code
            assert gone == (1 if name == "snap-flat" else 0)
    # A snapshot has no build: its logs end at once, with its state.
    logs = cli(tserver, "template", "logs", "snap", "--follow", timeout=60)
    assert logs.returncode == 0, logs.stderr


async def test_async_template_builds_with_an_async_callback(tserver: LiveServer, base: str) -> None:
    from corral.client import AsyncSandbox, AsyncTemplate

    steps: list[str] = []

    async def on_build_logs(entry: BuildLog) -> None:
        if entry.event is not None and entry.event.type == "step_start":
            steps.append(entry.event.reason)

    template = AsyncTemplate().from_template(base).run_cmd("echo async > /async.txt")
    info = await AsyncTemplate.build(
        template, "async-built", on_build_logs=on_build_logs, **opts(tserver)
    )
    assert info.state == "ready" and steps == ["step 1/1 RUN /bin/sh -c echo async > /async.txt"]
    assert "async-built" in {t.name for t in await AsyncTemplate.list(**opts(tserver))}
    async with await AsyncSandbox.create("async-built", **opts(tserver)) as sbx:
        assert (await sbx.commands.run("cat /async.txt")).stdout == "async\n"
    await AsyncTemplate.delete("async-built", **opts(tserver))
    with pytest.raises(NotFound):
        await AsyncTemplate.get("async-built", **opts(tserver))


def test_the_readme_examples_run_as_written(tserver: LiveServer, base: str, tmp_path: Path) -> None:
    from tests.test_readme_examples import readme_block

    after = "## Templates"
    shell = readme_block(after, "sh").splitlines()
    made_base = shell[0].split("#")[0].split()[3:]  # after `uv run corral`
    assert made_base[:3] == ["template", "build", "python-base"]
    made_base[made_base.index("--debian") + 1] = suite()  # the local archive's suite
    done = cli(tserver, *made_base)
    assert done.returncode == 0, done.stderr
    assert ": cached" in done.stdout  # the same Debian base as `base`: from the build cache

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "serve.py").write_text("import time\ntime.sleep(3600)\n")
    (tmp_path / "Dockerfile").write_text(readme_block(after, "dockerfile"))
    done = cli(
        tserver, "template", "build", "app", "-f", str(tmp_path / "Dockerfile"), str(tmp_path)
    )
    assert done.returncode == 0, done.stderr

    env = {**tserver.env, "CORRAL_SERVER": tserver.url, "CORRAL_API_KEY": tserver.key}
    ran = subprocess.run(
        [sys.executable, "-c", readme_block(after, "python")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert ran.returncode == 0, ran.stderr
    assert "built" in ran.stdout.splitlines(), ran.stdout  # the sandbox's cat
    assert "step 1/6 RUN /bin/sh -c echo built > /built.txt" in ran.stdout  # on_build_logs
    assert {"app", "app-after", "python-base"} <= names(tserver)


def test_cli_builds_a_recipe_with_its_context(
    tserver: LiveServer, base: str, tmp_path: Path
) -> None:
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "note.txt").write_text("from the context\n")
    (tmp_path / "recipe.yaml").write_text(
        f"template: {base}\n"
        "steps:\n"
        "  - echo from-recipe > /r.txt\n"
        "  - copy: {src: note.txt, dest: /opt/note.txt}\n"
        "ready: test -s /r.txt\n"
    )
    done = cli(
        tserver, "template", "build", "recipe", "--recipe", str(tmp_path / "recipe.yaml"),
        str(tmp_path / "ctx"), "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    assert made["source"] == "recipe" and made["ready_cmd"] == "test -s /r.txt"
    with Sandbox.create("recipe", **opts(tserver)) as sbx:
        assert sbx.commands.run("cat /r.txt /opt/note.txt").stdout.split() == [
            "from-recipe", "from", "the", "context",
        ]  # fmt: skip
