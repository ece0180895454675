"""`corral run`: create a sandbox, upload files, run one command with live output, destroy."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from corral.cli._common import connect_options, err, interruptible, parse_pairs
from corral.cli._stdin import StdinOption, stdin_source
from corral.client import Sandbox
from corral.errors import InvalidRequest

# The sandbox of a command without a timeout lives at most this long.
DEFAULT_LIFETIME = 3600


def _files(pairs: list[str] | None) -> list[tuple[bytes, str]]:
    files = []
    for pair in pairs or ():
        local, sep, remote = pair.partition(":")
        if not sep or not local or not remote:
            raise InvalidRequest(f"--file {pair!r} is not LOCAL:REMOTE")
        try:
            files.append((Path(local).read_bytes(), remote))
        except OSError as exc:
            raise InvalidRequest(f"--file {pair!r}: cannot read {local}: {exc.strerror}") from None
    return files


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def run(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="the command and its arguments")],
    template: Annotated[str, typer.Option(envvar="CORRAL_TEMPLATE")] = "host",
    isolation: Annotated[str, typer.Option(envvar="CORRAL_ISOLATION")] = "auto",
    timeout: Annotated[
        float | None,
        typer.Option(
            envvar="CORRAL_RUN_TIMEOUT", min=0, help="seconds before the command is killed"
        ),
    ] = None,
    env: Annotated[list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE")] = None,
    file: Annotated[
        list[str] | None, typer.Option("--file", "-f", help="LOCAL:REMOTE, uploaded first")
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE")
    ] = None,
    stdin: StdinOption = None,
) -> None:
    """Create a sandbox, run COMMAND in it with live output, destroy it; exit with its code."""
    envs = parse_pairs(env, "-e")
    uploads = _files(file)
    lifetime = math.ceil(timeout) + 30 if timeout else DEFAULT_LIFETIME
    with (
        interruptible(),
        Sandbox.create(
            template,
            isolation=isolation,
            envs=envs,
            metadata=parse_pairs(metadata, "--metadata"),
            timeout=lifetime,
            **connect_options(ctx).kwargs(),
        ) as box,
    ):
        for data, remote in uploads:
            box.files.write(remote, data)
        result = box.commands.run(
            command,
            timeout=timeout,
            on_stdout=_out,
            on_stderr=_err,
            input=stdin_source(stdin),
            raw_output=True,
        )
    if result.reason != "exited":
        err.print(f"[yellow]command ended: {result.reason}[/yellow] {result.error or ''}")
    raise typer.Exit(result.exit_code)
