"""`corral admin …`: teams and API keys, and the schema's migration, straight in the store
(not through the API).

Run it on the server's machine with the server's data directory; it is safe while the
server runs (the store is SQLite in WAL mode, or PostgreSQL).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cli._common import (
    add_output,
    command,
    env_file_option,
    err,
    group,
    number,
    out,
    setting_option,
    settings_from,
    show,
    usage_error,
    whole,
)

# The quota options of `team create` and `team set`: flag, type, help. None: left out.
QUOTA_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("--max-sandboxes", whole(0), "live sandboxes at once"),
    ("--max-memory-mib", whole(0), "memory of its live sandboxes, in total"),
    ("--max-cpu", number(float, minimum=0), "CPU cores of its live sandboxes, in total"),
    ("--max-disk-mib", whole(0), "writable storage of its live sandboxes, in total"),
    ("--max-running-jobs", whole(0), "its jobs running at once"),
    ("--max-log-mib", whole(0), "its stored job logs"),
    (
        "--max-api-rate",
        number(float, minimum=0),
        "requests a second per API key (0: the server's CORRAL_API_RATE)",
    ),
    ("--max-api-streams", whole(0), "streams open at once per API key (0: the server's)"),
)

if TYPE_CHECKING:
    from corral.cli._common import Commands, Parser


@contextmanager
def _store(args: argparse.Namespace) -> Iterator[Any]:
    from corral import logs
    from corral.store import Store

    settings = settings_from(args)
    logs.configure(settings.log_level)
    store = Store.open(settings)
    # On stderr: a key printed on stdout's last line stays easy to capture in a script.
    err(f"store: {store.url}")
    try:
        yield store
    finally:
        store.close()


def _quotas(args: argparse.Namespace) -> dict[str, Any]:
    """The quotas given on the command line, by their store names."""
    names = (flag[2:].replace("-", "_") for flag, _, _ in QUOTA_OPTIONS)
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def team_create(args: argparse.Namespace) -> None:
    """Create a team; then give it a key with `corral admin key create --team NAME`.

    A quota left out takes its default (`corral admin team list` shows them).
    """
    with _store(args) as store:
        team = store.create_team(args.name, **_quotas(args))
    out(f"created team {team.name} ({team.id})")


def team_set(args: argparse.Namespace) -> None:
    """Change a team's quotas; those left out stay. Takes effect at its next request.

    A quota lowered under what the team uses ends nothing: it is held to it from then on.
    """
    quotas = _quotas(args)
    if not quotas:
        usage_error("name at least one quota to change, e.g. --max-memory-mib 4096")
    with _store(args) as store:
        team = store.set_quotas(args.name, **quotas)
    out(f"team {team.name}: " + ", ".join(f"{k}={v:g}" for k, v in quotas.items()))


def team_list(args: argparse.Namespace) -> None:
    """The teams and their quotas."""
    from corral.store.teams import QUOTAS

    with _store(args) as store:
        teams = store.teams()
    show(args.output, teams, ("name", "id", *(name for name, _ in QUOTAS)))


def key_create(args: argparse.Namespace) -> None:
    """Create an API key; it is printed once, on the last line, and never shown again."""
    with _store(args) as store:
        key = store.create_api_key(args.team, e2b=args.e2b)
    out(f"API key for team {args.team} (store it now; it is not shown again):")
    out(key)


def key_revoke(args: argparse.Namespace) -> None:
    """Revoke an API key: calls with it fail from now on."""
    with _store(args) as store:
        store.revoke_api_key(args.key)
    out(f"revoked {args.key[:12]}…")


def migrate(args: argparse.Namespace) -> None:
    """Bring the store's schema to this Corral's newest revision (the server and workers
    do it when they start too: this does it first, e.g. before they are upgraded).

    A database a newer Corral migrated is refused, changed in nothing.
    """
    with _store(args) as store:
        schema = store.schema
    if schema.before == schema.after:
        out(f"schema at revision {schema.after}: up to date")
    else:
        out(f"schema migrated from revision {schema.before or '(empty)'} to {schema.after}")


def add_commands(commands: Commands) -> None:
    admin = group(commands, "admin", "Manage teams, API keys and the schema (local store).")
    teams = group(admin, "team", "Teams: tenants with quotas.")
    keys = group(admin, "key", "API keys: each belongs to one team.")

    def in_store(sub: Any, name: str, handler: Any) -> Parser:
        p = command(sub, name, handler)
        setting_option(
            p,
            "--data-dir",
            setting="data_dir",
            type=Path,
            help="the server's data directory (its store); default: the server's,"
            " /var/lib/corral as root, else ~/.local/share/corral",
        )
        setting_option(
            p,
            "--database-url",
            setting="database_url",
            help="the server's database when not SQLite in the data directory, e.g."
            " postgresql://USER:PASSWORD@HOST/DB",
        )
        env_file_option(p)  # the server's (/etc/corral/corral.env): its store, its database
        return p

    in_store(admin, "migrate", migrate)

    for name, handler in (("create", team_create), ("set", team_set)):
        p = in_store(teams, name, handler)
        p.add_argument(
            "name",
            metavar="NAME",
            help="lower-case letters, digits, - and _" if name == "create" else "the team",
        )
        for flag, kind, help in QUOTA_OPTIONS:
            p.add_argument(flag, type=kind, help=help)
    add_output(in_store(teams, "list", team_list))

    p = in_store(keys, "create", key_create)
    p.add_argument("--team", required=True, help="the team the key acts for")
    p.add_argument(
        "--e2b",
        action="store_true",
        help="in E2B's shape (e2b_ and 40 hex digits), which the e2b SDK accepts as "
        "E2B_API_KEY; it works with Corral's SDK and CLI too",
    )
    p = in_store(keys, "revoke", key_revoke)
    p.add_argument("key", metavar="KEY", help="the whole key, or its first 12 characters")
