"""`corral install` / `corral uninstall`, written under a temp root (`--root`): units that
`systemd-analyze verify` accepts (their ExecStart the real corral command), an env file
of mode 0600 with the settings given, and an uninstall that removes exactly what the
install wrote. Bad options are refused and change nothing. No test touches this host's
systemd: with --root, neither command calls systemctl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.config import read_env_file

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
CORRAL = Path(sys.executable).with_name("corral")
SYSTEM_UNITS = Path("etc/systemd/system")


def corral(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return subprocess.run(
        [str(CORRAL), *args], capture_output=True, text=True, timeout=60, env={**environ, **env}
    )


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under `root`: its text and mode."""
    return {
        str(p.relative_to(root)): (p.read_text(), p.stat().st_mode & 0o777)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def verify(units: Path, tmp_path: Path, *options: str, **env: str) -> None:
    """`systemd-analyze verify` on the server unit and an instance of the worker's."""
    copy = tmp_path / "verify"
    shutil.copytree(units, copy)
    (copy / "corral-worker@1.service").symlink_to("corral-worker@.service")
    done = subprocess.run(
        ["systemd-analyze", *options, "verify", "corral-server.service", "corral-worker@1.service"],
        cwd=copy,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    # A misspelt or unknown option is only a warning, on stderr: none is allowed.
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_a_system_install_verifies_and_uninstall_removes_exactly_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    done = corral("install", "--root", str(root), "--set", "port=8080", "--set", "LOG_LEVEL=debug")
    assert done.returncode == 0, done.stderr
    assert "systemctl enable --now corral-server corral-worker@1" in done.stdout
    files = tree(root)
    assert set(files) == {
        "etc/systemd/system/corral-server.service",
        "etc/systemd/system/corral-worker@.service",
        "etc/corral/corral.env",
        "etc/corral/installed",
    }
    assert files["etc/corral/corral.env"][1] == 0o600  # it may hold the database's password
    assert read_env_file(root / "etc/corral/corral.env") == {
        "CORRAL_PORT": "8080",
        "CORRAL_LOG_LEVEL": "debug",
    }
    server = files["etc/systemd/system/corral-server.service"][0]
    assert f"ExecStart={CORRAL} server --env-file /etc/corral/corral.env\n" in server
    worker = files["etc/systemd/system/corral-worker@.service"][0]
    assert f"ExecStart={CORRAL} worker --env-file /etc/corral/corral.env\n" in worker
    for unit in (server, worker):
        for line in ("ExecReload=/bin/kill -HUP $MAINPID", "Delegate=yes", "KillMode=mixed"):
            assert f"\n{line}\n" in unit
        assert "\nProtectSystem=full\n" in unit and "\nNoNewPrivileges=yes\n" in unit
    verify(root / SYSTEM_UNITS, tmp_path)

    done = corral("uninstall", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert tree(root) == {}
    assert not (root / "etc/corral").exists()  # made by the install, empty now


def test_a_user_install_verifies_in_a_user_instance(tmp_path: Path) -> None:
    root, runtime = tmp_path / "root", tmp_path / "run"
    root.mkdir()
    runtime.mkdir(mode=0o700)
    home = {"XDG_CONFIG_HOME": "/home/u/.config"}
    assert corral("install", "--user", "--root", str(root), **home).returncode == 0
    units = root / "home/u/.config/systemd/user"
    server = (units / "corral-server.service").read_text()
    assert "--env-file /home/u/.config/corral/corral.env" in server
    assert "\nWantedBy=default.target\n" in server
    assert "\nProtectSystem=" not in server  # would need a user namespace of systemd's
    verify(units, tmp_path, "--user", XDG_RUNTIME_DIR=str(runtime))
    assert corral("uninstall", "--user", "--root", str(root), **home).returncode == 0
    assert tree(root) == {}


def test_an_env_file_already_there_is_kept_and_never_removed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/corral").mkdir(parents=True)
    (root / "etc/corral/corral.env").write_text("CORRAL_PORT=9999\n")
    done = corral("install", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout
    assert (root / "etc/corral/corral.env").read_text() == "CORRAL_PORT=9999\n"
    assert corral("uninstall", "--root", str(root)).returncode == 0
    assert tree(root) == {"etc/corral/corral.env": ("CORRAL_PORT=9999\n", 0o644)}

    # --force replaces it, and then it is the install's to remove.
    assert corral("install", "--root", str(root), "--force", "--set", "port=1").returncode == 0
    assert read_env_file(root / "etc/corral/corral.env") == {"CORRAL_PORT": "1"}
    assert corral("uninstall", "--root", str(root)).returncode == 0
    assert tree(root) == {}


def test_dry_run_prints_the_units_and_writes_nothing(tmp_path: Path) -> None:
    done = corral("install", "--root", str(tmp_path), "--dry-run", "--set", "port=8080")
    assert done.returncode == 0, done.stderr
    assert "# /etc/systemd/system/corral-server.service\n" in done.stdout
    assert "CORRAL_PORT=8080" in done.stdout
    assert tree(tmp_path) == {}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "prot=8080"], "--set 'prot=8080' is not NAME=VALUE with a setting's name"),
        (["--set", "port"], "--set 'port' is not NAME=VALUE"),
        (["--set", "port=http"], "CORRAL_PORT='http' is not an integer"),
        (["--set", "env_file=/x"], "--set 'env_file=/x' is not NAME=VALUE"),
        (["--exec", "/nonexistent/corral"], "not an executable file: pass the corral command"),
        (["--exec", "/etc"], "--exec /etc: not an executable file"),
        (["--set", "port=1"], "corral.env exists: edit it, or pass --force"),  # 2nd install
        ([], "corral-server.service exists: `corral uninstall` first, or pass --force"),
    ],
)
def test_a_bad_install_is_refused_and_changes_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    if "exists" in message:
        assert corral("install", "--root", str(root)).returncode == 0
    before = tree(root)
    done = corral("install", "--root", str(root), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert tree(root) == before


def test_refusals_of_where_to_install(tmp_path: Path) -> None:
    done = corral("install", "--root", str(tmp_path / "missing"))
    assert (done.returncode, done.stderr.strip()) == (
        2,
        f"error: --root {tmp_path / 'missing'}: no such directory: create it, or leave it out",
    )
    # Not root (a user namespace of our own: uid 65534 there), for the real system.
    done = subprocess.run(
        ["unshare", "--user", str(CORRAL), "install"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "a system install writes /etc/systemd/system and /etc/corral: run it as root" in (
        done.stderr
    )
    done = corral("uninstall", "--root", str(tmp_path))
    assert done.returncode == 2
    assert "nothing to uninstall: /etc/corral/installed (written by `corral install`)" in (
        done.stderr
    )


def test_uninstall_removes_only_an_installs_files_whatever_its_list_says(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert corral("install", "--root", str(root)).returncode == 0
    (root / "etc/keep").write_text("mine\n")
    with (root / "etc/corral/installed").open("a") as manifest:
        manifest.write("/etc/keep\n")
    assert corral("uninstall", "--root", str(root)).returncode == 0
    assert tree(root) == {"etc/keep": ("mine\n", 0o644)}
