"""The `corral` command.

Until the API server lands, `run` and `doctor` drive the engine in this process; they
become API calls through the SDK when the server exists (API-first).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from corral.config import Settings
from corral.errors import CorralError, InvalidRequest

# Named exit codes, documented in the README.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True)


def _fail(exc: CorralError) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}")
    code = EXIT_USAGE if isinstance(exc, InvalidRequest) else EXIT_UNAVAILABLE
    return typer.Exit(code)


@app.command()
def doctor() -> None:
    """Say which isolation tiers this host offers and what is missing for the others."""
    from corral.isolation import capabilities

    settings = Settings.from_env()
    table = Table("backend", "available", "missing / details")
    for name, caps in capabilities(settings).items():
        note = "\n".join(caps.missing) or ", ".join(f"{k}={v}" for k, v in caps.details.items())
        table.add_row(name, "[green]yes[/green]" if caps.available else "[red]no[/red]", note)
    Console().print(table)


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"-e {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


@app.command(context_settings={"allow_interspersed_args": False})
def run(
    command: Annotated[list[str], typer.Argument(help="the command and its arguments")],
    template: Annotated[str, typer.Option(envvar="CORRAL_TEMPLATE")] = "host",
    isolation: Annotated[str, typer.Option(envvar="CORRAL_ISOLATION")] = "auto",
    timeout: Annotated[
        float | None, typer.Option(help="seconds before the command is killed")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE")] = None,
) -> None:
    """Create a sandbox, run COMMAND in it with live output, destroy it; exit with its code."""
    from corral.isolation import Engine

    async def main() -> int:
        async with Engine(Settings.from_env()) as engine:
            sandbox = await engine.create(
                template=template, env=_parse_env(env or []), isolation=isolation
            )
            cmd = await sandbox.exec(command, timeout=timeout)
            async for chunk in cmd:
                out = sys.stdout if chunk.stream == "stdout" else sys.stderr
                out.buffer.write(chunk.data)
                out.flush()
            result = await cmd.wait()
            if result.reason != "exited":
                err.print(f"[yellow]command ended: {result.reason}[/yellow] {result.error or ''}")
            return result.exit_code

    try:
        code = asyncio.run(main())
    except CorralError as exc:
        raise _fail(exc) from None
    raise typer.Exit(code)


def main() -> None:
    app()
