"""The server's `base` template (E2B's default): every team's without a build, with the
tools E2B code uses, `user` in /home/user, umask 022 and `root`; through a real server
whose base comes from the cached tar (tests/kit/e2b_base.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from corral import Sandbox
from corral.config import Settings
from corral.errors import InvalidRequest, TemplateNotFound, TemplateNotReady
from corral.images import LayerStore, tree_digest
from corral.isolation import Engine
from corral.store import Store
from corral.templates import TemplateCatalog
from corral.templates import base as server_base
from tests.conftest import LiveServer, opts
from tests.kit import e2b_base, rootless
from tests.kit.polling import wait_until
from tests.test_template_catalog import tiny_layer

pytestmark = [pytest.mark.sandbox, *e2b_base.needs_base()]


@pytest.fixture(scope="module")
def base_server(settings: Settings) -> Iterator[LiveServer]:
    with e2b_base.server_with_base(settings, "base-server-data") as server:
        yield server


def run(sbx: Sandbox, line: str, user: str = "") -> str:
    """`line` in a login bash (as E2B's SDK runs every command); its stdout, checked."""
    done = sbx.commands.run(["/bin/bash", "-l", "-c", line], user=user)
    assert done.exit_code == 0, (line, done.stdout, done.stderr)
    return str(done.stdout)


def test_base_has_the_tools_e2b_code_uses(base_server: LiveServer) -> None:
    with Sandbox.create("base", timeout=120, **opts(base_server)) as sbx:
        login = run(sbx, "echo $0; shopt -q login_shell && echo login")
        assert login.split() == ["/bin/bash", "login"]
        assert run(sbx, "python3 -c 'import sys, ssl; print(sys.version_info[0])'").strip() == "3"
        assert run(sbx, "curl --version").startswith("curl ")
        assert run(sbx, "TERM=xterm-256color tput cols").strip().isdigit()
        assert "ps" in run(sbx, "ps -o comm=")
        for tool in ("ln", "realpath", "touch", "kill", "sudo"):
            assert run(sbx, f"command -v {tool}").strip(), tool
        run(sbx, "test -x /usr/sbin/useradd")  # root's PATH has it (Debian's user PATH not)
        log = run(
            sbx,
            "git init -q repo && cd repo && git config user.email a@b && git config user.name a"
            " && echo hi > f && git add f && git commit -qm first && git log --format=%s",
        )
        assert log.strip() == "first"
        # A background git daemon, reached on loopback, then killed.
        run(
            sbx,
            "git daemon --reuseaddr --base-path=/home/user --export-all --port=9418 "
            "--pid-file=/tmp/gitd.pid --detach /home/user/repo",
        )
        wait_until(lambda: sbx.commands.run("test -s /tmp/gitd.pid").exit_code == 0, "git daemon")
        cloned = run(sbx, "git clone -q git://127.0.0.1:9418/repo clone && cat clone/f")
        assert cloned.strip() == "hi"
        run(sbx, "kill $(cat /tmp/gitd.pid)")
        wait_until(
            lambda: sbx.commands.run("kill -0 $(cat /tmp/gitd.pid)").exit_code != 0,
            "git daemon to exit",
        )


def test_base_runs_as_user_in_its_home_with_umask_022(base_server: LiveServer) -> None:
    with Sandbox.create("base", timeout=120, **opts(base_server)) as sbx:
        who = run(sbx, "id -un; id -u; id -gn; id -Gn; pwd; echo $HOME; stat -c %U:%G:%a .")
        name, uid, group, groups, cwd, home, owner = who.splitlines()
        assert (name, uid, group, cwd, home) == ("user", "1000", "user", "/home/user", "/home/user")
        assert "sudo" in groups.split() and owner.startswith("user:user:")
        assert run(sbx, "getent passwd user").strip().endswith(":/home/user:/bin/bash")
        modes = run(sbx, "umask; touch f; mkdir d; stat -c %a f d")
        assert modes.split() == ["0022", "644", "755"]
        assert run(sbx, "id -u; id -un", user="root").split() == ["0", "root"]
        # A login shell's PATH is still Debian's for each (its profile asks bash's $EUID
        # instead of forking `id -u`).
        assert "/usr/sbin" not in run(sbx, "echo $PATH").strip().split(":")
        assert "/usr/sbin" in run(sbx, "echo $PATH", user="root").strip().split(":")
        profile = run(sbx, "cat /etc/profile")
        assert '"${EUID:-$(id -u)}"' in profile and '[ "$(id -u)"' not in profile


def test_every_team_gets_base_and_its_own_base_wins(base_server: LiveServer) -> None:
    other = base_server.new_team("e2b-other")
    with Sandbox.create("base", timeout=120, server=base_server.url, api_key=other) as sbx:
        assert run(sbx, "id -un").strip() == "user"


def catalog_of(settings: Settings, **changes: object) -> tuple[TemplateCatalog, Store, Engine]:
    settings = settings.with_(**changes)
    store = Store.open(settings)
    engine = Engine(settings)
    return TemplateCatalog(settings, store, engine), store, engine


async def test_the_server_base_resolves_for_teams_without_their_own(
    settings: Settings, tmp_path: Path
) -> None:
    data = settings.runtime_dir / f"catalog-{tmp_path.name}"
    record = e2b_base.install(data)
    catalog, store, engine = catalog_of(settings, data_dir=data, base_template="off")
    try:
        team = store.create_team("alpha").id
        name = catalog.resolve(team, "base")
        assert name == record.template_id
        assert server_base.ensure_base(catalog) == record  # there: nothing to build
        assert engine.templates.get(name).user == "user"  # type: ignore[union-attr]
        assert engine.templates.get(name).workdir == "/home/user"  # type: ignore[union-attr]
        # Its layers survive a collect: no row names them, the record does.
        assert catalog.collect(min_age=0) == []
        # A team's own `base` wins for that team, and only for it.
        own = tiny_layer(catalog.layers)
        catalog.add_layers(team, "base", [own.digest], source="debian")
        assert catalog.resolve(team, "base") not in (name, "base")
        assert name in engine.templates.names()
    finally:
        await engine.aclose()
        store.close()


async def test_without_a_base_off_is_not_found_and_first_use_starts_a_build(
    settings: Settings, tmp_path: Path
) -> None:
    data = settings.runtime_dir / f"nobase-{tmp_path.name}"
    catalog, store, engine = catalog_of(settings, data_dir=data, base_template="off")
    try:
        team = store.create_team("alpha").id
        with pytest.raises(TemplateNotFound, match="CORRAL_BASE_TEMPLATE=off"):
            catalog.resolve(team, "base")
        # First use starts the build, from a mirror that fails at once (offline).
        missing = "deb [trusted=yes] copy:///nonexistent-corral-mirror ./"
        catalog.server_base = server_base.ServerBase(catalog.layers, missing, "first-use")
        with pytest.raises(TemplateNotReady, match="try again shortly"):
            catalog.resolve(team, "base")
        assert catalog.server_base.wait(120) is None
        with pytest.raises(TemplateNotReady, match="could not be built"):
            catalog.resolve(team, "base")
        # `start`: loading the catalog starts the build (here failing again, offline).
        catalog.server_base = server_base.ServerBase(catalog.layers, missing, "start")
        catalog.settings = catalog.settings.with_(base_template="start")
        catalog.load()
        assert catalog.server_base.wait(120) is None
        with pytest.raises(TemplateNotReady, match="could not be built"):
            catalog.resolve(team, "base")
    finally:
        catalog.server_base.wait(120)
        await engine.aclose()
        store.close()


def test_settings_refuse_an_unknown_base_mode() -> None:
    with pytest.raises(Exception, match="CORRAL_BASE_TEMPLATE='always' is unknown"):
        Settings.from_env({"CORRAL_BASE_TEMPLATE": "always"})


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def test_boot_id_is_the_sandboxs_own_kept_across_a_pause_new_at_each_start(
    base_server: LiveServer,
) -> None:
    host = Path(BOOT_ID).read_text()
    with Sandbox.create("base", timeout=120, **opts(base_server)) as sbx:
        first = sbx.files.read(BOOT_ID)
        assert first != host and len(first.strip()) == 36 and first.count("-") == 4
        assert run(sbx, f"cat {BOOT_ID}") == first  # the same for commands and files
        code = sbx.commands.run(f"echo x > {BOOT_ID}", user="root").exit_code
        assert code != 0  # read-only, even for root
        sbx.pause()
        sbx.resume()
        assert sbx.files.read(BOOT_ID) == first
        with Sandbox.create("base", timeout=120, **opts(base_server)) as other:
            assert other.files.read(BOOT_ID) not in (first, host)
        snapshot = sbx.snapshot("booted")
    with Sandbox.create(snapshot.name, timeout=120, **opts(base_server)) as started:
        assert started.files.read(BOOT_ID) not in (first, host)


def test_a_layer_adopted_from_another_store_shares_its_files(tmp_path: Path) -> None:
    first, second = LayerStore(tmp_path / "a"), LayerStore(tmp_path / "b")
    layer = tiny_layer(first, "shared")
    adopted = second.adopt(layer)
    assert (adopted.digest, adopted.size_bytes) == (layer.digest, layer.size_bytes)
    assert adopted.path != layer.path and tree_digest(adopted.path) == layer.digest
    here, there = layer.path / "etc" / "greeting", adopted.path / "etc" / "greeting"
    assert here.stat().st_ino == there.stat().st_ino  # linked, not copied
    assert second.adopt(layer) == adopted  # stored already: nothing again
    with pytest.raises(InvalidRequest, match="not a layer digest"):
        second.adopt(replace(layer, digest="sha256:nope"))


def test_a_rootless_server_says_it_cannot_make_base() -> None:
    # As nobody: a rootless server's catalog (layer templates need root).
    with rootless.home() as home:
        script = (
            "from pathlib import Path; from corral.images import LayerStore; "
            "from corral.templates.base import ServerBase; "
            f"store = LayerStore(Path({str(home / 'data')!r}))\n"
            "print(ServerBase(store, 'x', 'first-use').missing())"
        )
        done = subprocess.run(
            ["setpriv", f"--reuid={rootless.NOBODY}", f"--regid={rootless.NOBODY}",
             "--clear-groups", sys.executable, "-c", script],
            capture_output=True, text=True,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "layer templates need Corral to run as root; use 'host'" in done.stdout
