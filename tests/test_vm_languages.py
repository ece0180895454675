"""`corral vm` for javascript, ruby and go (python's is tests/test_vms.py): each
language's template built on first use from the local archive, its hello world, a
command, /persist across stop/start, delete. Slow (each first build 30-130 s on the
shared cores): `make test-slow`."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from corral.client import Vm, Volume
from corral.config import Settings
from corral.images.languages import LANGUAGES
from tests.conftest import LiveServer, opts, require_backend, start_server
from tests.kit.debian import MIRROR, needs_archive

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

# A command of each language that reads what it is given.
PROGRAMS = {
    "javascript": "node -e 'console.log(process.argv[1].length)' corral",
    "ruby": "ruby -e 'puts ARGV[0].length' corral",
    "go": 'printf \'package main\\nimport "fmt"\\nfunc main() { fmt.Println(len("corral")) }\\n\''
    " > n.go && go run n.go",
}


@pytest.fixture(scope="module")
def vserver(settings: Settings) -> Iterator[LiveServer]:
    require_backend(settings, "namespace")
    data = settings.runtime_dir / f"vm-langs-{secrets.token_hex(4)}"
    live = start_server(settings, data, pool_size=0, extra_env={"CORRAL_DEBIAN_MIRROR": MIRROR})
    try:
        yield live
    finally:
        live.stop()


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "language",
    [
        pytest.param(name, marks=needs_archive(*base.packages))
        for name, base in LANGUAGES.items()
        if name != "python"
    ],
)
def test_a_language_vm_says_hello_runs_and_keeps_persist(
    vserver: LiveServer, language: str
) -> None:
    name = f"vm-{language}"
    info = Vm.create(name, language=language, persist=True, memory_mib=1024, **opts(vserver))
    assert info.state == "stopped" and info.template == f"lang-{language}", info
    try:
        hello = Vm.hello(name, timeout=300, **opts(vserver))
        assert hello.exit_code == 0 and hello.stdout == "hello\n", hello
        ran = Vm.run(name, PROGRAMS[language], cwd="/tmp", timeout=300, **opts(vserver))
        assert ran.exit_code == 0 and ran.stdout == "6\n", ran
        assert Vm.run(name, "echo kept > /persist/k", **opts(vserver)).exit_code == 0
        Vm.stop(name, **opts(vserver))
        assert Vm.run(name, "cat /persist/k", **opts(vserver)).stdout == "kept\n"
    finally:
        Vm.delete(name, **opts(vserver))
    assert f"vm-{name}" not in {v.name for v in Volume.list(**opts(vserver))}
