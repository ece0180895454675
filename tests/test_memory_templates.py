"""Memory templates: on a tier with memory snapshots, a create of a template with a start
command restores a sandbox of it whose start command already ran (made by its first such
create), instead of running the start command again. Through a real server whose `base`
comes from the cached tar: two sandboxes share the start command's process and memory but
not their files; the template shows its images; a restart keeps them; deleting the
template removes them; another team never gets them; a create a restore cannot honour
(its own environment, a volume) starts cold."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import Limits, Sandbox, Template, Volume
from corral.config import Settings
from tests.conftest import LiveServer, opts, require_backend, start_server
from tests.kit import e2b_base

pytestmark = [pytest.mark.sandbox, *e2b_base.needs_base()]

# Writes a marker (its pid, the time, a token made once: in its memory) after importing
# what a warmed interpreter would have, then waits; the ready check waits for the marker.
START = (
    "exec python3 -c 'import os, time, json, decimal, email.parser, http.server, sqlite3; "
    'token = os.urandom(8).hex(); greeting = os.environ.get("GREETING", "-"); '
    'open("/tmp/marker.tmp", "w").write(" ".join(map(str, (os.getpid(), time.time(), '
    'token, greeting)))); os.rename("/tmp/marker.tmp", "/tmp/marker"); time.sleep(10**6)\''
)
# The same marker from the shell, for the microvm test: Python's start under TCG would
# cost it ~15 s of the guest's CPU, and what it checks is the restore, not the warming.
START_SH = (
    'echo "$$ $(date +%s) $(od -An -N8 -tx1 /dev/urandom | tr -d " \\n") -" > /tmp/marker.tmp'
    " && mv /tmp/marker.tmp /tmp/marker && exec sleep 1000000"
)
READY = "test -s /tmp/marker"
MADE = "memory image, made now"
RESTORED = "memory image (its start command had run)"


def _build(server: LiveServer, name: str, api_key: str | None = None, start: str = START) -> None:
    template = Template().from_template("base").set_start_cmd(start, READY)
    options = {**opts(server), **({"api_key": api_key} if api_key else {})}
    Template.build(template, name, **options)


def _marker(sbx: Sandbox) -> tuple[int, str, str]:
    pid, _, token, greeting = sbx.files.read("/tmp/marker").split()
    return int(pid), token, greeting


def _start_alive(sbx: Sandbox, pid: int) -> bool:
    return [p.pid for p in sbx.commands.list() if p.tag == "start"] == [pid] and (
        sbx.commands.run(f"kill -0 {pid}").exit_code == 0
    )


def _images(data: Path) -> list[Path]:
    return sorted((data / "memory-templates").glob("*/*/*.json"))


@pytest.fixture(scope="module")
def gserver(settings: Settings) -> Iterator[LiveServer]:
    require_backend(settings, "gvisor")
    with e2b_base.server_with_base(settings, "memory-templates") as server:
        _build(server, "warm")
        yield server


def test_two_sandboxes_restore_one_started_template_apart(gserver: LiveServer) -> None:
    with (
        Sandbox.create("warm", isolation="gvisor", timeout=120, **opts(gserver)) as first,
        Sandbox.create("warm", isolation="gvisor", timeout=120, **opts(gserver)) as second,
    ):
        assert MADE in first.info.state_reason
        assert RESTORED in second.info.state_reason
        pid, token, _ = _marker(first)
        assert _marker(second)[:2] == (pid, token)  # the same start, run once
        assert _start_alive(first, pid) and _start_alive(second, pid)
        # Separate sandboxes: a write in one is not in the other; each is named itself.
        first.files.write("/tmp/own", "first")
        assert second.commands.run("test -e /tmp/own").exit_code == 1
        for sbx in (first, second):
            name = sbx.sandbox_id.replace("_", "-")
            assert sbx.files.read("/etc/hostname").strip() == name
        [image] = Template.get("warm", **opts(gserver)).memory_images
        assert (image.isolation, image.network, image.memory_mib) == ("gvisor", "none", 512)
        assert image.size_bytes > 0
        shown = gserver.corral("template", "get", "warm")
        assert shown.returncode == 0 and "gvisor (512 MiB" in shown.stdout, shown.stderr
        shown = gserver.corral("template", "get", "warm", "--output", "json")
        [listed] = json.loads(shown.stdout)["memory_images"]
        assert (listed["isolation"], listed["memory_mib"]) == ("gvisor", 512)
        # Other limits are another image; a create's own environment starts cold (the
        # start command reads it).
        with Sandbox.create(
            "warm", isolation="gvisor", envs={"GREETING": "hi"}, timeout=60, **opts(gserver)
        ) as cold:
            assert cold.info.state_reason == "created"
            assert _marker(cold)[1:] != (token, "-")
            assert _marker(cold)[2] == "hi"
        # So does one with a volume (not in the image).
        Volume.create("memory-templates-data", size_mib=16, **opts(gserver))
        with Sandbox.create(
            "warm",
            isolation="gvisor",
            volumes=["memory-templates-data:/data"],
            timeout=60,
            **opts(gserver),
        ) as cold:
            assert cold.info.state_reason == "created"
            assert _marker(cold)[1] != token
    # A namespace sandbox has no memory snapshots: it starts as it always did.
    with Sandbox.create("warm", isolation="namespace", timeout=60, **opts(gserver)) as plain:
        assert plain.info.state_reason == "created"
    assert len(Template.get("warm", **opts(gserver)).memory_images) == 1


def test_another_team_never_restores_a_teams_image(gserver: LiveServer) -> None:
    ours = Sandbox.create("warm", isolation="gvisor", timeout=60, **opts(gserver))
    try:
        token = _marker(ours)[1]
    finally:
        ours.kill()
    other = gserver.new_team("memory-templates-other")
    _build(gserver, "warm", api_key=other)  # the same name and recipe, its own
    theirs = {**opts(gserver), "api_key": other}
    with Sandbox.create("warm", isolation="gvisor", timeout=60, **theirs) as sbx:
        assert MADE in sbx.info.state_reason  # not ours: made for that team
        assert _marker(sbx)[1] != token


def test_images_survive_a_restart_and_go_with_their_template(settings: Settings) -> None:
    require_backend(settings, "gvisor")
    data = settings.runtime_dir / "memory-templates-restart"
    e2b_base.install(data)
    first = start_server(settings, data, pool_size=0)
    try:
        _build(first, "kept")
        with Sandbox.create("kept", isolation="gvisor", timeout=60, **opts(first)) as sbx:
            token = _marker(sbx)[1]
    finally:
        first.stop(signal.SIGKILL)
    second = start_server(settings, data, pool_size=0)
    try:
        assert len(_images(data)) == 1
        with Sandbox.create("kept", isolation="gvisor", timeout=60, **opts(second)) as sbx:
            assert RESTORED in sbx.info.state_reason
            assert _marker(sbx)[1] == token
        # A rebuild replaces the version, and its images with it.
        _build(second, "kept")
        assert _images(data) == []
        with Sandbox.create("kept", isolation="gvisor", timeout=60, **opts(second)) as sbx:
            assert MADE in sbx.info.state_reason
            assert _marker(sbx)[1] != token
        assert len(_images(data)) == 1
        Template.delete("kept", **opts(second))
        assert _images(data) == []
        assert not any((data / "memory-templates").glob("*/*/*"))
    finally:
        second.stop()


# Lean (about 15 s under TCG: one boot, one checkpoint, two restores): in `make test`.
def test_microvm_sandboxes_restore_the_started_template_each_named_itself(
    settings: Settings,
) -> None:
    require_backend(settings, "microvm")
    with e2b_base.server_with_base(settings, "memory-templates-microvm") as server:
        _build(server, "warm", start=START_SH)
        boxes = []
        try:
            for _ in range(2):
                boxes.append(
                    Sandbox.create(
                        "warm",
                        isolation="microvm",
                        limits=Limits(memory_mib=256),
                        timeout=120,
                        **opts(server),
                    )
                )
            first, second = boxes
            assert MADE in first.info.state_reason
            assert RESTORED in second.info.state_reason
            pid, token, _ = _marker(first)
            assert _marker(second)[:2] == (pid, token)
            assert _start_alive(second, pid)
            first.files.write("/tmp/own", "first")
            assert second.commands.run("test -e /tmp/own").exit_code == 1
            for sbx in boxes:  # the guest kernel's name too, set after the restore
                name = sbx.sandbox_id.replace("_", "-")
                assert sbx.commands.run("hostname").stdout.strip() == name
                assert sbx.files.read("/etc/hostname").strip() == name
            [image] = Template.get("warm", **opts(server)).memory_images
            assert (image.isolation, image.memory_mib) == ("microvm", 256)
        finally:
            for sbx in boxes:
                sbx.kill()
