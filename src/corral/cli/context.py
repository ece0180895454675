"""`corral context …`: kubectl-style named servers in ~/.corral/config (or $CORRAL_CONFIG)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from corral.cli._common import out
from corral.client import ConfigFile, Context
from corral.client._config import normalize_server

app = typer.Typer(no_args_is_help=True, help="Named servers and keys (~/.corral/config).")


@app.command("list")
def list_() -> None:
    """The contexts; * marks the current one."""
    config = ConfigFile.load()
    table = Table("", "name", "server", "api key", "timeout", box=None, pad_edge=False)
    for name, ctx in sorted(config.contexts.items()):
        key = f"{ctx.api_key[:12]}…" if ctx.api_key else "-"
        timeout = "-" if ctx.timeout_seconds is None else f"{ctx.timeout_seconds:g}s"
        table.add_row("*" if name == config.current else "", name, ctx.server, key, timeout)
    out.print(table)
    if not config.contexts:
        out.print(
            f"no contexts in {config.path}; add one with `corral context set NAME --server URL`"
        )


@app.command()
def use(name: Annotated[str, typer.Argument(help="a context from `corral context list`")]) -> None:
    """Make NAME the current context."""
    config = ConfigFile.load()
    config.context(name)  # refuses an unknown name, saying how to add it
    config.current = name
    config.save()
    out.print(f"current context: {name}")


@app.command("set")
def set_(
    name: Annotated[str, typer.Argument(help="the context to add or change")],
    server: Annotated[str | None, typer.Option(help="http://HOST:PORT")] = None,
    api_key: Annotated[str | None, typer.Option(help="the team's API key")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds per call")] = None,
    use: Annotated[bool, typer.Option("--use", help="also make it current")] = False,
) -> None:
    """Add a context or change its fields (the file is readable by you only)."""
    config = ConfigFile.load()
    ctx = config.contexts.get(name)
    if ctx is None:
        if server is None:
            raise typer.BadParameter("a new context needs --server", param_hint="--server")
        ctx = config.contexts[name] = Context(normalize_server(server))
    if server is not None:
        ctx.server = normalize_server(server)
    if api_key is not None:
        ctx.api_key = api_key or None
    if timeout is not None:
        ctx.timeout_seconds = timeout
    if use or config.current is None:
        config.current = name
    config.save()
    out.print(f"context {name}: {ctx.server}" + (" (current)" if config.current == name else ""))
