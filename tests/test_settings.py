"""Settings: every CORRAL_ variable parsed in one place, bad values refused by name, each
variable with one meaning, and the store's database URL."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from corral.config import ENV_PREFIX, Settings
from corral.errors import InvalidRequest


def corral_here(data_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A `corral` command that runs Corral here (server, worker, admin) on `data_dir`."""
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        env={**os.environ, "CORRAL_DATA_DIR": str(data_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


# A value of each type a setting can have, as the environment spells it, and as parsed.
_SAMPLES: dict[str, tuple[str, Any]] = {
    "Path": ("/x/y", Path("/x/y")),
    "str": ("debug", "debug"),
    "bool": ("yes", True),
    "int": ("7", 7),
    "float": ("1.5", 1.5),
}


@pytest.mark.parametrize("name", [f.name for f in fields(Settings)])
def test_every_setting_is_read_from_its_variable(name: str) -> None:
    kind = str(next(f.type for f in fields(Settings) if f.name == name))
    raw, parsed = _SAMPLES[kind]
    if name == "database_url":
        raw, parsed = "sqlite:////x/corral.db", "sqlite:////x/corral.db"
    if name == "uid_base":  # checked: no host user's ids
        raw, parsed = "100000", 100000
    if name in ("network_modes", "network_private_allow"):  # checked as modes, CIDRs
        raw = parsed = {"network_modes": "none,allowlist"}.get(name, "10.99.0.0/16")
    if name in ("e2b_network", "base_template", "gvisor_platform", "metrics", "http_server"):
        raw = parsed = {
            "e2b_network": "internet",
            "gvisor_platform": "ptrace",
            "http_server": "uvicorn",
        }.get(name, "off")  # one of a few words
    if name == "pools":  # checked as TIER:TEMPLATE=SIZE entries
        raw = parsed = "gvisor:base=1,microvm:host=0"
    settings = Settings.from_env({ENV_PREFIX + name.upper(): raw})
    assert getattr(settings, name) == parsed


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("CORRAL_PORT", "http", "CORRAL_PORT='http' is not an integer"),
        ("CORRAL_JOB_LEASE", "-5", "CORRAL_JOB_LEASE='-5' is negative: use 0 or more"),
        ("CORRAL_ALLOW_PROCESS_BACKEND", "maybe", "use 1 or 0"),
        ("CORRAL_MEMORY_OVERCOMMIT", "nan", "is not a number"),
        ("CORRAL_LOG_LEVEL", "loud", "CORRAL_LOG_LEVEL='loud' is unknown: use debug, info"),
        ("CORRAL_E2B_NETWORK", "all", "CORRAL_E2B_NETWORK='all' is unknown: use none"),
        ("CORRAL_GVISOR_PLATFORM", "fast", "='fast' is unknown: use auto, systrap, kvm, ptrace"),
        ("CORRAL_HTTP_SERVER", "nginx", "='nginx' is unknown: use auto, pyvoy, uvicorn"),
        ("CORRAL_POOLS", "gvisor=1", "entry 'gvisor=1' is not TIER:TEMPLATE=SIZE"),
        ("CORRAL_METRICS", "yes", "CORRAL_METRICS='yes' is unknown: use auth"),
        ("CORRAL_METRICS_PORT", "70000", "CORRAL_METRICS_PORT=70000 is not a port"),
        ("CORRAL_DATABASE_URL", "corral.db", "is not a database URL: use e.g. sqlite:"),
        ("CORRAL_DATABASE_URL", "me:secret@db/corral", r"URL='…@db/corral' is not a database"),
    ],
)
def test_a_bad_value_names_its_variable_and_what_to_use(var: str, value: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        Settings.from_env({var: value})


def test_a_bad_flag_is_refused_as_its_variable_would_be() -> None:
    with pytest.raises(InvalidRequest, match="CORRAL_LOG_LEVEL='loud'"):
        Settings.from_env({}, log_level="loud")


# -- one meaning per variable ---------------------------------------------------------------


def _cli_variables() -> list[tuple[tuple[str, ...], str]]:
    """(command path, variable) of every CLI option that shows an environment variable."""
    from corral.cli import parser

    found: list[tuple[tuple[str, ...], str]] = []

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*path, name))
            elif action.help and "[env: " in action.help:
                found.append((path, action.help.split("[env: ")[1].rstrip("]")))

    walk(parser(), ())
    return found


# The commands that run Corral here (not through the API): their options set Settings.
_LOCAL_COMMANDS = {"server", "worker", "admin", "doctor"}


def test_no_cli_option_reuses_a_server_setting_s_variable() -> None:
    """A client option named like a Settings variable would give it a second meaning
    (CORRAL_ISOLATION was once the server's default tier and the tier `run` asks for)."""
    server_variables = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    clashes = [
        (" ".join(path), variable)
        for path, variable in _cli_variables()
        if variable in server_variables and path[0] not in _LOCAL_COMMANDS
    ]
    assert clashes == []
    assert ((("run",), "CORRAL_ISOLATION")) in _cli_variables()


def test_the_options_of_local_commands_are_settings_read_by_settings(tmp_path: Path) -> None:
    server_variables = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    local = [(p, v) for p, v in _cli_variables() if p[:1] and p[0] in _LOCAL_COMMANDS]
    # CORRAL_OUTPUT (table or json) is how the CLI prints, for every command alike.
    strays = [(p, v) for p, v in local if v not in server_variables and v != "CORRAL_OUTPUT"]
    assert len(local) > 1 and strays == []
    # Read and checked once, by Settings: a bad value names its variable.
    done = corral_here(tmp_path, "worker", CORRAL_JOB_WORKERS="-1")
    assert done.returncode == 2
    assert "CORRAL_JOB_WORKERS='-1' is negative: use 0 or more" in done.stderr


def test_corral_isolation_is_the_cli_s_and_the_server_default_has_its_own() -> None:
    settings = Settings.from_env({"CORRAL_ISOLATION": "process"})
    assert settings.default_isolation == "auto"
    settings = Settings.from_env({"CORRAL_DEFAULT_ISOLATION": "namespace"})
    assert settings.default_isolation == "namespace"


def test_a_worker_started_with_the_old_variable_says_which_one_to_set(tmp_path: Path) -> None:
    # A bad log level stops it right after the note.
    done = corral_here(tmp_path, "worker", CORRAL_ISOLATION="process", CORRAL_LOG_LEVEL="none")
    assert done.returncode == 2
    assert "CORRAL_ISOLATION=process only sets the tier `corral run`" in done.stderr
    assert "set CORRAL_DEFAULT_ISOLATION" in done.stderr


# -- the database URL -------------------------------------------------------------------------


def test_the_store_opens_the_database_url(tmp_path: Path) -> None:
    from corral.store import Store

    db = tmp_path / "elsewhere.db"
    settings = Settings.from_env(
        {"CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_DATABASE_URL": f"sqlite:///{db}"}
    )
    store = Store.open(settings)
    try:
        store.create_team("t")
        assert store.url == f"sqlite:///{db}"
    finally:
        store.close()
    assert db.stat().st_size > 0
    assert not (tmp_path / "data" / "corral.db").exists()


def test_without_a_database_url_the_store_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    from corral.store import Store

    store = Store.open(Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path)}))
    store.close()
    assert store.url == f"sqlite:///{tmp_path / 'corral.db'}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+psycopg2://corral:secret@127.0.0.1/c", "needs the Python package 'psycopg2"),
        # Nothing listens on port 1 of loopback.
        ("postgresql://corral:secret@127.0.0.1:1/corral", "cannot be reached: .*check that"),
        ("nosuchdb://x/y", "names a database SQLAlchemy does not know"),
    ],
)
def test_a_database_url_the_store_cannot_use_is_refused_clearly(
    tmp_path: Path, url: str, message: str
) -> None:
    from corral.store import Store

    settings = Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path), "CORRAL_DATABASE_URL": url})
    with pytest.raises(InvalidRequest, match=message) as caught:
        Store.open(settings)
    assert "secret" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_corral_admin_says_what_is_wrong_with_the_database_url(tmp_path: Path) -> None:
    url = "postgresql://corral@127.0.0.1:1/corral"  # nothing listens on port 1 of loopback
    done = corral_here(tmp_path, "admin", "team", "list", CORRAL_DATABASE_URL=url)
    assert done.returncode == 2
    assert "CORRAL_DATABASE_URL='postgresql+psycopg://corral@127.0.0.1:1/corral' cannot" in (
        done.stderr
    )
