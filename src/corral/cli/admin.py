"""`corral admin …`: teams and API keys, straight in the local store (not through the API).

Run it on the server's machine with the server's data directory; it is safe while the
server runs (the store is SQLite in WAL mode, or PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.cli._common import OUTPUT_OPTION, Output, err, out, show
from corral.config import Settings

app = typer.Typer(no_args_is_help=True, help="Manage teams and API keys (local store).")
team_app = typer.Typer(no_args_is_help=True, help="Teams: tenants with quotas.")
key_app = typer.Typer(no_args_is_help=True, help="API keys: each belongs to one team.")
app.add_typer(team_app, name="team")
app.add_typer(key_app, name="key")

DATA_DIR: Any = typer.Option(
    None,
    "--data-dir",
    envvar="CORRAL_DATA_DIR",
    show_default="the server's: /var/lib/corral as root, else ~/.local/share/corral",
    help="the server's data directory (its store)",
)


@contextmanager
def _store(data_dir: Path | None) -> Iterator[Any]:
    from corral.store import Store

    overrides = {} if data_dir is None else {"data_dir": data_dir}
    store = Store.open(Settings.from_env(None, **overrides))
    # On stderr: a key printed on stdout's last line stays easy to capture in a script.
    err.print(f"store: {store.url}", soft_wrap=True)
    try:
        yield store
    finally:
        store.close()


# The quota options of `team create` and `team set`; None: left out.
MaxSandboxes = Annotated[int | None, typer.Option(help="live sandboxes at once")]
MaxMemory = Annotated[int | None, typer.Option(help="memory of its live sandboxes, in total")]
MaxCpu = Annotated[float | None, typer.Option(help="CPU cores of its live sandboxes, in total")]
MaxDisk = Annotated[
    int | None, typer.Option(help="writable storage of its live sandboxes, in total")
]
MaxRunningJobs = Annotated[int | None, typer.Option(help="its jobs running at once")]
MaxLogs = Annotated[int | None, typer.Option(help="its stored job logs")]


def _given(**quotas: Any) -> dict[str, Any]:
    return {name: value for name, value in quotas.items() if value is not None}


@team_app.command("create")
def team_create(
    name: Annotated[str, typer.Argument(help="lower-case letters, digits, - and _")],
    max_sandboxes: MaxSandboxes = None,
    max_memory_mib: MaxMemory = None,
    max_cpu: MaxCpu = None,
    max_disk_mib: MaxDisk = None,
    max_running_jobs: MaxRunningJobs = None,
    max_log_mib: MaxLogs = None,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Create a team; then give it a key with `corral admin key create --team NAME`.

    A quota left out takes its default (`corral admin team list` shows them).
    """
    quotas = _given(
        max_sandboxes=max_sandboxes,
        max_memory_mib=max_memory_mib,
        max_cpu=max_cpu,
        max_disk_mib=max_disk_mib,
        max_running_jobs=max_running_jobs,
        max_log_mib=max_log_mib,
    )
    with _store(data_dir) as store:
        team = store.create_team(name, **quotas)
    out.print(f"created team {team.name} ({team.id})")


@team_app.command("set")
def team_set(
    name: Annotated[str, typer.Argument(help="the team")],
    max_sandboxes: MaxSandboxes = None,
    max_memory_mib: MaxMemory = None,
    max_cpu: MaxCpu = None,
    max_disk_mib: MaxDisk = None,
    max_running_jobs: MaxRunningJobs = None,
    max_log_mib: MaxLogs = None,
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Change a team's quotas; those left out stay. Takes effect at its next request.

    A quota lowered under what the team uses ends nothing: it is held to it from then on.
    """
    quotas = _given(
        max_sandboxes=max_sandboxes,
        max_memory_mib=max_memory_mib,
        max_cpu=max_cpu,
        max_disk_mib=max_disk_mib,
        max_running_jobs=max_running_jobs,
        max_log_mib=max_log_mib,
    )
    if not quotas:
        raise typer.BadParameter("name at least one quota to change, e.g. --max-memory-mib 4096")
    with _store(data_dir) as store:
        team = store.set_quotas(name, **quotas)
    out.print(f"team {team.name}: " + ", ".join(f"{k}={v:g}" for k, v in quotas.items()))


@team_app.command("list")
def team_list(data_dir: Path | None = DATA_DIR, output: Output = OUTPUT_OPTION) -> None:
    from corral.store.teams import QUOTAS

    with _store(data_dir) as store:
        teams = store.teams()
    show(output, teams, ("name", "id", *(name for name, _ in QUOTAS)))


@key_app.command("create")
def key_create(
    team: Annotated[str, typer.Option(help="the team the key acts for")],
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Create an API key; it is printed once, on the last line, and never shown again."""
    with _store(data_dir) as store:
        key = store.create_api_key(team)
    out.print(f"API key for team {team} (store it now; it is not shown again):")
    print(key)


@key_app.command("revoke")
def key_revoke(
    key: Annotated[str, typer.Argument(help="the whole key, or its first 12 characters")],
    data_dir: Path | None = DATA_DIR,
) -> None:
    """Revoke an API key: calls with it fail from now on."""
    with _store(data_dir) as store:
        store.revoke_api_key(key)
    out.print(f"revoked {key[:12]}…")
