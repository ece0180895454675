"""`corral vm` as a user runs it (the CLI as a subprocess against a real server, its
Debian mirror the tests' local archive): create with the template build's progress, run
with --file and the command's exit code, exec --hello and a command fanned out over two
vms with --all, list states, stop --all, clean --all (volumes gone), bad input refused
with a clear message and nothing made."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from tests.conftest import DATABASES, LiveServer, database_url, require_backend
from tests.kit.build_cache import BuildCache, build_server
from tests.kit.debian import needs_archive

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(600), *needs_archive("python3")]

TIMEOUT = 300


@pytest.fixture(scope="module", params=DATABASES)
def vserver(
    settings: Settings, build_cache: BuildCache, request: pytest.FixtureRequest
) -> Iterator[LiveServer]:
    """On SQLite, and on PostgreSQL (vms, their templates and volumes are the store's); the second
    builds nothing the first did (`build_cache`)."""
    require_backend(settings, "namespace")
    with build_server(settings, "vm-cli", database_url(request), build_cache) as live:
        yield live


def vms(server: LiveServer, *flags: str) -> dict[str, dict[str, object]]:
    listed = server.corral("vm", "list", *flags, "-o", "json")
    assert listed.returncode == 0, listed.stderr
    return {vm["name"]: vm for vm in json.loads(listed.stdout)}


def volumes(server: LiveServer) -> set[str]:
    listed = server.corral("volume", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    return {v["name"] for v in json.loads(listed.stdout)}


def test_a_session_create_run_exec_all_list_stop_clean(vserver: LiveServer, tmp_path: Path) -> None:
    made = vserver.corral(
        "vm", "create", "a", "--language", "python", "--persist", "--mem", "256", timeout=TIMEOUT
    )
    assert made.returncode == 0, made.stderr
    assert "bootstrapping Debian" in made.stdout  # the template build's progress
    assert "created vm a (python, template lang-python)" in made.stderr
    made = vserver.corral("vm", "create", "b", "--language", "python", "-o", "json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["state"] == "stopped"  # the template is reused

    (tmp_path / "main.py").write_text(
        "import sys; print(open('/in/main.py').read()[:6]); sys.exit(5)\n"
    )
    ran = vserver.corral(
        "vm", "run", "a", "--file", str(tmp_path / "main.py"), "--", "python3", "main.py",
        timeout=TIMEOUT,
    )  # fmt: skip
    assert ran.returncode == 5, ran.stderr
    assert ran.stdout == "import\n"
    assert set(vms(vserver)) == {"a"}  # only running ones without --all
    listed = vms(vserver, "--all")
    assert {n: v["state"] for n, v in listed.items()} == {"a": "running", "b": "stopped"}

    hello = vserver.corral("vm", "exec", "--all", "--hello", "-o", "json", timeout=TIMEOUT)
    assert hello.returncode == 0, hello.stderr
    assert {r["name"]: (r["exit_code"], r["stdout"]) for r in json.loads(hello.stdout)} == {
        "a": (0, "hello\n"),
        "b": (0, "hello\n"),
    }
    fanned = vserver.corral("vm", "exec", "a", "b", "--", "sh", "-c", "test -d /persist")
    assert fanned.returncode == 1, fanned.stdout  # b has no /persist
    assert "== a: exit 0" in fanned.stdout and "== b: exit 1" in fanned.stdout

    stopped = vserver.corral("vm", "stop", "--all")
    assert stopped.returncode == 0, stopped.stderr
    assert vms(vserver) == {} and {v["state"] for v in vms(vserver, "--all").values()} == {
        "stopped"
    }
    assert "vm-a" in volumes(vserver)
    cleaned = vserver.corral("vm", "clean", "--all")
    assert cleaned.returncode == 0, cleaned.stderr
    assert vms(vserver, "--all") == {} and "vm-a" not in volumes(vserver)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--language", "cobol"), "choose one of python, javascript, ruby, go"),
        (("--language", "python", "--cpu", "5000"), "cpu"),
        (("--language", "python", "--mem", "8"), "memory_mib"),
        (("--language", "python", "--network", "all"), "invalid choice"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message_and_nothing_made(
    vserver: LiveServer, args: tuple[str, ...], message: str
) -> None:
    done = vserver.corral("vm", "create", "bad", "--persist", *args)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    done = vserver.corral("vm", "create", "Bad_Name", "--language", "python")
    assert done.returncode != 0 and "vm name 'Bad_Name' is invalid" in done.stderr
    assert "bad" not in vms(vserver, "--all") and "vm-bad" not in volumes(vserver)


def test_usage_errors_say_what_to_give(vserver: LiveServer) -> None:
    done = vserver.corral("vm", "exec", "a")
    assert done.returncode == 2 and "--hello, or `-- COMMAND" in done.stderr
    done = vserver.corral("vm", "stop")
    assert done.returncode == 2 and "NAME" in done.stderr
    done = vserver.corral("vm", "run", "a")
    assert done.returncode == 2 and "say what to run" in done.stderr
    done = vserver.corral("vm", "run", "nope", "--", "true")
    assert done.returncode == 4 and "no vm named 'nope'" in done.stderr


def test_create_isolation_runs_the_vm_on_that_tier(vserver: LiveServer, settings: Settings) -> None:
    require_backend(settings, "gvisor")
    made = vserver.corral(
        "vm", "create", "g", "--language", "python", "--isolation", "gvisor", "-o", "json",
        timeout=TIMEOUT,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["isolation"] == "gvisor"
    try:
        ran = vserver.corral("vm", "run", "g", "--", "true", timeout=TIMEOUT)
        assert ran.returncode == 0, ran.stderr
        sandbox_id = vms(vserver)["g"]["sandbox_id"]
        listed = vserver.corral("sandbox", "list", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        (sandbox,) = [s for s in json.loads(listed.stdout) if s["sandbox_id"] == sandbox_id]
        assert sandbox["isolation"] == "gvisor"
        # The env variable the CLI's other creates take, and a tier no Corral has.
        unknown = vserver.corral("vm", "create", "h", "--language", "python", CORRAL_ISOLATION="x")
        assert unknown.returncode != 0 and "unknown isolation backend 'x'" in unknown.stderr
        assert "h" not in vms(vserver, "--all")
    finally:
        vserver.corral("vm", "clean", "g")
