"""The `corral` command: a client of the API (through the SDK), plus the server itself.

Every sandbox command is an API call any client can make; `doctor` (this host) and
`admin` (the local store) are the only ones that work locally.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from corral.cli import admin, context, job, sandbox
from corral.cli._common import EXIT_INTERRUPTED, Connect, err, fail, out
from corral.cli.run import run
from corral.config import Settings
from corral.errors import CorralError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(sandbox.app, name="sandbox")
app.add_typer(job.app, name="job")
app.add_typer(context.app, name="context")
app.add_typer(admin.app, name="admin")
app.command(context_settings={"allow_interspersed_args": False})(run)


def _print_version(value: bool) -> None:
    if value:
        from corral import __version__

        print(f"corral {__version__}")
        raise typer.Exit()


@app.callback()
def connection(
    ctx: typer.Context,
    server: Annotated[
        str | None, typer.Option(envvar="CORRAL_SERVER", help="the API server, http://HOST:PORT")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="CORRAL_API_KEY", help="your team's API key")
    ] = None,
    context: Annotated[
        str | None, typer.Option(envvar="CORRAL_CONTEXT", help="a context of `corral context list`")
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Where sandbox commands go: flags, else env vars, else the current context."""
    ctx.obj = Connect(server, api_key, context)


@app.command()
def server(
    host: Annotated[
        str | None, typer.Option(envvar="CORRAL_HOST", help="address to listen on")
    ] = None,
    port: Annotated[int | None, typer.Option(envvar="CORRAL_PORT")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(envvar="CORRAL_DATA_DIR", help="the store and default key")
    ] = None,
    pool_size: Annotated[
        int | None, typer.Option(envvar="CORRAL_POOL_SIZE", help="sandboxes kept ready")
    ] = None,
    log_level: Annotated[str | None, typer.Option(envvar="CORRAL_LOG_LEVEL")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            envvar="CORRAL_JOB_WORKERS", help="jobs run at once in this process (0: none)"
        ),
    ] = None,
    demo: Annotated[
        bool, typer.Option(help="once up, run a first command through the API and say what next")
    ] = False,
) -> None:
    """Run the API server in the foreground (Ctrl-C stops it; twice forces)."""
    from corral.server import serve

    overrides = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "data_dir": data_dir,
            "pool_size": pool_size,
            "log_level": log_level,
            "job_workers": workers,
        }.items()
        if v is not None
    }
    raise typer.Exit(serve(Settings.from_env(None, **overrides), demo=demo))


@app.command()
def worker(
    data_dir: Annotated[
        Path | None, typer.Option(envvar="CORRAL_DATA_DIR", help="the store the server uses")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(envvar="CORRAL_JOB_WORKERS", help="jobs run at once")
    ] = None,
    log_level: Annotated[str | None, typer.Option(envvar="CORRAL_LOG_LEVEL")] = None,
) -> None:
    """Run jobs from the server's store in this process, beside the server's own workers
    (Ctrl-C stops it: its running jobs go back to the queue)."""
    from corral.jobs.daemon import run_worker
    from corral.server import logs

    overrides = {
        k: v
        for k, v in {"data_dir": data_dir, "job_workers": workers, "log_level": log_level}.items()
        if v is not None
    }
    settings = Settings.from_env(None, **overrides)
    logs.configure(settings.log_level)
    raise typer.Exit(run_worker(settings))


@app.command()
def doctor() -> None:
    """Say which isolation tiers this host offers, what is missing for the others, and how
    much memory it admits sandboxes to."""
    from corral.isolation import capabilities
    from corral.isolation.admission import MemoryCapacity

    settings = Settings.from_env()
    table = Table("backend", "available", "missing / details")
    for name, caps in capabilities(settings).items():
        note = "\n".join(caps.missing) or ", ".join(f"{k}={v}" for k, v in caps.details.items())
        table.add_row(name, "[green]yes[/green]" if caps.available else "[red]no[/red]", note)
    out.print(table)
    out.print(
        f"sandbox memory capacity per process: {MemoryCapacity.of_host(settings).describe()} "
        "(CORRAL_MEMORY_RESERVE_MIB, CORRAL_MEMORY_OVERCOMMIT)"
    )


def main() -> None:
    code: int | str | None = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code
    except CorralError as exc:
        code = fail(exc)
    except KeyboardInterrupt:
        err.print("interrupted")
        code = EXIT_INTERRUPTED
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Leave without finalizing the interpreter.

    The HTTP client's Rust runtime (pyqwest, under connect-python) keeps worker threads
    that can panic while Python tears itself down, aborting about one short-lived process
    in twenty with SIGABRT after all work is done. A CLI has nothing left to finalize once
    its output is flushed, so it exits directly with its code.
    """
    if isinstance(code, str):
        err.print(code)
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code or 0)
