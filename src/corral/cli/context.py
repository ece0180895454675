"""`corral context …`: kubectl-style named servers in ~/.corral/config (or $CORRAL_CONFIG)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from corral.cli._common import command, group, number, out, print_table, usage_error

if TYPE_CHECKING:
    from corral.cli._common import Commands


def list_(args: argparse.Namespace) -> None:
    """The contexts; * marks the current one."""
    from corral.client._config import ConfigFile

    config = ConfigFile.load()
    rows = []
    for name, ctx in sorted(config.contexts.items()):
        key = f"{ctx.api_key[:12]}…" if ctx.api_key else "-"
        timeout = "-" if ctx.timeout_seconds is None else f"{ctx.timeout_seconds:g}s"
        rows.append(["*" if name == config.current else "", name, ctx.server, key, timeout])
    print_table(rows, header=("", "name", "server", "api key", "timeout"))
    if not config.contexts:
        out(f"no contexts in {config.path}; add one with `corral context set NAME --server URL`")


def use(args: argparse.Namespace) -> None:
    """Make NAME the current context."""
    from corral.client._config import ConfigFile

    config = ConfigFile.load()
    config.context(args.name)  # refuses an unknown name, saying how to add it
    config.current = args.name
    config.save()
    out(f"current context: {args.name}")


def set_(args: argparse.Namespace) -> None:
    """Add a context or change its fields (the file is readable by you only)."""
    from corral.client._config import ConfigFile, Context, normalize_server
    from corral.client._tls import check_ca_file

    config = ConfigFile.load()
    name = args.name
    ctx = config.contexts.get(name)
    if ctx is None:
        if args.server is None:
            usage_error(f"context {name!r} is new: give its --server URL")
        ctx = config.contexts[name] = Context(normalize_server(args.server))
    if args.server is not None:
        ctx.server = normalize_server(args.server)
    if args.api_key is not None:
        ctx.api_key = args.api_key or None
    if args.timeout is not None:
        ctx.timeout_seconds = args.timeout
    if args.ca_file is not None:  # "" clears it
        ctx.ca_file = check_ca_file(args.ca_file) if args.ca_file else None
    if args.use or config.current is None:
        config.current = name
    config.save()
    out(f"context {name}: {ctx.server}" + (" (current)" if config.current == name else ""))


def add_commands(commands: Commands) -> None:
    sub = group(commands, "context", "Named servers and keys (~/.corral/config).")
    command(sub, "list", list_)
    p = command(sub, "use", use)
    p.add_argument("name", metavar="NAME", help="a context from `corral context list`")
    p = command(sub, "set", set_)
    p.add_argument("name", metavar="NAME", help="the context to add or change")
    p.add_argument("--server", help="http://HOST:PORT")
    p.add_argument("--api-key", help="the team's API key")
    p.add_argument("--timeout", type=number(float, minimum=0), help="seconds per call")
    p.add_argument("--ca-file", metavar="FILE", help="https: PEM CA file to verify the server with")
    p.add_argument("--use", action="store_true", help="also make it current")
