"""`corral vm` through the SDK against a real server (its Debian mirror the tests' local
archive): a python vm's template built on first use and reused by a second vm, hello,
run with files in /in and /out, /persist across stop/start, delete with and without
--keep-persist, list states, bad input refused with nothing made, and teams that never
see each other's vms. The CLI's side is tests/test_vm_cli.py; the other languages are
tests/test_vm_languages.py (slow)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.client import Sandbox, Template, Vm, Volume
from corral.client._config import ClientSettings
from corral.client._connection import Connection
from corral.client._portal import run
from corral.config import Settings
from corral.errors import (
    InvalidLimits,
    InvalidRequest,
    IsolationUnavailable,
    UnknownBackend,
    UnknownVm,
    VmExists,
)
from corral.v1 import vms_pb2 as pb
from tests.conftest import DATABASES, LiveServer, database_url, opts, require_backend
from tests.kit.build_cache import BuildCache, build_server
from tests.kit.debian import needs_archive

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(600), *needs_archive("python3")]


@pytest.fixture(scope="module", params=DATABASES)
def vserver(
    settings: Settings, build_cache: BuildCache, request: pytest.FixtureRequest
) -> Iterator[LiveServer]:
    """On SQLite, and on PostgreSQL (vms, their templates and volumes are the store's); the second
    builds nothing the first did (`build_cache`)."""
    require_backend(settings, "namespace")
    with build_server(settings, "vms", database_url(request), build_cache) as live:
        yield live


@pytest.fixture(scope="module")
def py(vserver: LiveServer, build_cache: BuildCache) -> str:
    """A python vm with /persist; its create waits for the team's `lang-python` (built
    once a module: the next server's build hits what the first saved)."""
    seen: list[object] = []
    info = Vm.create(
        "py", language="python", persist=True, on_build_logs=seen.append, **opts(vserver)
    )
    assert info.state == "stopped" and info.template == "lang-python", info
    assert info.volume == "vm-py" and seen  # the build's progress came through
    build_cache.save(vserver)
    return "py"


def test_hello_exec_and_files_in_and_out(vserver: LiveServer, py: str, tmp_path: Path) -> None:
    hello = Vm.hello(py, **opts(vserver))
    assert hello.exit_code == 0 and hello.stdout == "hello\n", hello
    assert Vm.get(py, **opts(vserver)).state == "running"

    (tmp_path / "main.py").write_text(
        "import sys\nopen('/out/result.txt', 'w').write('computed\\n')\n"
        "print('ran', sys.argv[1]); sys.exit(3)\n"
    )
    out = tmp_path / "out"
    lines: list[str] = []
    ran = Vm.run(
        py,
        ["python3", "main.py", "arg"],
        files=[tmp_path / "main.py"],
        out_dir=out,
        on_stdout=lines.append,
        **opts(vserver),
    )
    assert ran.exit_code == 3 and lines == ["ran arg"], (ran, lines)
    assert (out / "result.txt").read_text() == "computed\n"


def test_persist_survives_stop_and_start_the_rest_does_not(vserver: LiveServer, py: str) -> None:
    ran = Vm.run(py, "echo kept > /persist/note && echo gone > /tmp/note", **opts(vserver))
    assert ran.exit_code == 0, ran
    first = Vm.get(py, **opts(vserver)).sandbox_id
    stopped = Vm.stop(py, **opts(vserver))
    assert stopped.state == "stopped" and stopped.sandbox_id is None
    assert py not in {v.name for v in Vm.list(**opts(vserver))}  # only running ones
    assert py in {v.name for v in Vm.list(all=True, **opts(vserver))}
    ran = Vm.run(py, "cat /persist/note; cat /tmp/note || echo no-tmp", **opts(vserver))
    assert ran.stdout.split() == ["kept", "no-tmp"], ran
    assert Vm.get(py, **opts(vserver)).sandbox_id not in (None, first)


def test_a_second_vm_reuses_the_template_and_delete_keeps_persist_on_request(
    vserver: LiveServer, py: str
) -> None:
    built = Template.get("lang-python", **opts(vserver))
    info = Vm.create("py2", language="python", persist=True, **opts(vserver))
    assert info.state == "stopped"  # no build: the team's template is ready
    assert Template.get("lang-python", **opts(vserver)).build_job_id == built.build_job_id
    assert Vm.run("py2", "echo two > /persist/x", **opts(vserver)).exit_code == 0

    Vm.delete("py2", keep_persist=True, **opts(vserver))
    with pytest.raises(UnknownVm):
        Vm.get("py2", **opts(vserver))
    assert "vm-py2" in {v.name for v in Volume.list(**opts(vserver))}
    # Created again with persist, it has its data back; a plain delete removes the volume.
    Vm.create("py2", language="python", persist=True, **opts(vserver))
    assert Vm.run("py2", "cat /persist/x", **opts(vserver)).stdout == "two\n"
    Vm.delete("py2", **opts(vserver))
    assert "vm-py2" not in {v.name for v in Volume.list(**opts(vserver))}


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"language": "cobol"}, InvalidRequest, "python, javascript, ruby, go"),
        ({"name": "Bad_Name"}, InvalidRequest, "vm name"),
        ({"cpu": -1.0}, InvalidLimits, "cpu"),
        ({"cpu": 4096.0}, InvalidLimits, "cpu"),
        ({"memory_mib": 8}, InvalidLimits, "memory_mib"),
        ({"memory_mib": 1 << 20}, InvalidLimits, "memory_mib"),
        ({"network": "everything"}, InvalidRequest, "none, allow_all"),
        ({"isolation": "gvisr"}, UnknownBackend, "unknown isolation backend 'gvisr'"),
        # A tier without layer templates (this server allows `process`): refused as its
        # sandboxes would be, FAILED_PRECONDITION.
        ({"isolation": "process"}, IsolationUnavailable, "cannot start sandboxes of the layer"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_made(
    vserver: LiveServer, fields: dict[str, object], error: type[Exception], match: str
) -> None:
    request: dict[str, Any] = {"name": "bad", "language": "python", "persist": True, **fields}
    with pytest.raises(error, match=match):  # the SDK checks first
        Vm.create(**request, **opts(vserver))

    async def create() -> None:
        connection = Connection(ClientSettings.resolve(**opts(vserver)))
        try:
            await connection.call(connection.vms.create, pb.CreateVmRequest(**request))
        finally:
            await connection.aclose()

    with pytest.raises(error, match=match):  # straight to the API: the server refuses it too
        run(create())
    assert "bad" not in {v.name for v in Vm.list(all=True, **opts(vserver))}
    assert "vm-bad" not in {v.name for v in Volume.list(**opts(vserver))}


def test_a_name_taken_is_refused_and_another_team_sees_no_vm(vserver: LiveServer, py: str) -> None:
    with pytest.raises(VmExists, match="vm clean py"):
        Vm.create(py, language="ruby", **opts(vserver))
    assert Vm.get(py, **opts(vserver)).language == "python"

    other: dict[str, Any] = {"server": vserver.url, "api_key": vserver.new_team("vm-other")}
    assert Vm.list(all=True, **other) == []
    for call in (Vm.get, Vm.start, Vm.stop, Vm.delete):
        with pytest.raises(UnknownVm):
            call(py, **other)
    assert Vm.get(py, **opts(vserver)).name == py  # untouched


def test_a_volume_refused_leaves_no_vm_and_starts_no_build(vserver: LiveServer) -> None:
    # Past CORRAL_VOLUME_MAX_MIB: refused by the volumes after the vm's row was written.
    with pytest.raises(InvalidRequest, match="CORRAL_VOLUME_MAX_MIB"):
        Vm.create("big", language="ruby", persist=True, persist_mib=1 << 20, **opts(vserver))
    assert "big" not in {v.name for v in Vm.list(all=True, **opts(vserver))}
    assert "lang-ruby" not in {t.name for t in Template.list(**opts(vserver))}


def test_a_vm_runs_on_the_tier_it_names_and_old_ones_on_the_default(
    vserver: LiveServer, py: str, settings: Settings
) -> None:
    require_backend(settings, "gvisor")
    assert Vm.get(py, **opts(vserver)).isolation == "auto"  # none named: the server's default
    info = Vm.create("gv", language="python", isolation="gvisor", **opts(vserver))
    assert (info.isolation, info.state) == ("gvisor", "stopped")  # lang-python reused
    try:
        hello = Vm.hello("gv", **opts(vserver))
        assert hello.exit_code == 0 and hello.stdout == "hello\n", hello
        running = Vm.get("gv", **opts(vserver))
        assert running.isolation == "gvisor" and running.sandbox_id is not None
        sandboxes = {s.sandbox_id: s for s in Sandbox.list(**opts(vserver))}
        assert sandboxes[running.sandbox_id].isolation == "gvisor"
    finally:
        Vm.delete("gv", **opts(vserver))
