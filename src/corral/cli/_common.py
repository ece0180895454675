"""What every `corral` command shares: exit codes, error lines, output, connection options."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from corral import errors

# Named exit codes, documented in the README.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_AUTH = 5
EXIT_QUOTA = 6
EXIT_UNREACHABLE = 7
EXIT_STATE = 8
# How a job that timed out or was canceled ends `job logs -f`, `submit --wait`/`--follow`
# (124 as coreutils `timeout`), whatever its killed command's own code (137) was.
EXIT_TIMED_OUT = 124
EXIT_CANCELED = 125
EXIT_INTERRUPTED = 130

# Most specific first, as in corral._wire.
_EXIT_CODES: tuple[tuple[type[errors.CorralError], int], ...] = (
    (errors.InvalidRequest, EXIT_USAGE),
    (errors.IsolationUnavailable, EXIT_UNAVAILABLE),
    (errors.NotFound, EXIT_NOT_FOUND),
    (errors.FileNotFound, EXIT_NOT_FOUND),
    (errors.AuthError, EXIT_AUTH),
    (errors.QuotaExceeded, EXIT_QUOTA),
    (errors.CapacityExceeded, EXIT_QUOTA),
    (errors.NoSpace, EXIT_QUOTA),
    (errors.ServerUnavailable, EXIT_UNREACHABLE),
    (errors.SandboxNotRunning, EXIT_STATE),
    (errors.CommandError, EXIT_STATE),
    (errors.FileError, EXIT_STATE),
)

err = Console(stderr=True, highlight=False)
# Piped, a table's rows stay one line each (for grep, awk, cut) instead of wrapping at 80
# columns mid-word; rich sizes a table to the console's width.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 100_000)


def exit_code_for(exc: errors.CorralError) -> int:
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


def fail(exc: errors.CorralError) -> int:
    """Print the one line that says what went wrong and what to do; the exit code."""
    err.print(f"[red]error:[/red] {exc}", soft_wrap=True, markup=True)
    return exit_code_for(exc)


class Output(StrEnum):
    table = "table"
    json = "json"


OUTPUT_OPTION: Any = typer.Option(
    Output.table,
    "--output",
    "-o",
    envvar="CORRAL_OUTPUT",
    help="table for people, json for scripts",
)


@dataclass
class Connect:
    """Where sandbox commands send their calls (the global options)."""

    server: str | None = None
    api_key: str | None = None
    context: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"server": self.server, "api_key": self.api_key, "context": self.context}


def connect_options(ctx: typer.Context) -> Connect:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Connect) else Connect()


def parse_pairs(pairs: Sequence[str] | None, flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise errors.InvalidRequest(f"{flag} {pair!r} is not KEY=VALUE")
        result[key] = value
    return result


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def show(
    output: Output, rows: Sequence[Any], columns: Sequence[str], *, single: bool = False
) -> None:
    """Print dataclass rows as a table (the given columns) or as JSON (every field)."""
    if output is Output.json:
        data = _plain(rows[0] if single else list(rows))
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table(box=None, pad_edge=False)
    for i, column in enumerate(columns):
        table.add_column(column, no_wrap=i == 0)  # ids stay whole, to copy and paste
    for row in rows:
        table.add_row(*(_cell(getattr(row, c.replace(" ", "_"), "")) for c in columns))
    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, float):
        # Two decimals at most (a CPU percentage, not its 17 digits), no trailing zeros.
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C ends the command with exit code 130 and no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
