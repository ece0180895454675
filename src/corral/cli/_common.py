"""What every `corral` command shares: the parser, options, exit codes, error lines, output.

The CLI is built on the standard library's argparse and imports what a command needs only
when that command runs: `corral --help` and `corral sandbox list` are run in loops and
scripts, and a framework or the SDK's streaming stack loaded up front would cost more
than the call itself (`benchmarks/cli.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from corral import errors  # the error classes only: the standard library, nothing else
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.config import Settings

    # What a command group adds its subcommands to (`corral sandbox` → create, list, …).
    Commands = argparse._SubParsersAction["Parser"]

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

# What a command's function gets and returns: the parsed arguments; its exit code.
Handler = Callable[[argparse.Namespace], int | None]


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
    (errors.TemplateInUse, EXIT_STATE),
    (errors.CommandError, EXIT_STATE),
    (errors.FileError, EXIT_STATE),
)


def exit_code_for(exc: errors.CorralError) -> int:
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


# -- writing -------------------------------------------------------------------------------


def _colored(text: str, color: str, stream: Any) -> str:
    """`text` in an ANSI color when `stream` is a terminal and NO_COLOR is not set."""
    if os.environ.get("NO_COLOR") or not getattr(stream, "isatty", lambda: False)():
        return text
    codes = {"red": "31", "yellow": "33", "green": "32", "bold": "1"}
    return f"\033[{codes[color]}m{text}\033[0m"


def out(text: object = "") -> None:
    print(text, flush=True)


def err(text: object = "") -> None:
    print(text, file=sys.stderr, flush=True)


def warn(label: str, detail: str = "") -> None:
    """A yellow note on stderr, e.g. how a command ended when it did not exit."""
    err(f"{_colored(label, 'yellow', sys.stderr)} {detail}".rstrip())


def _error_line(message: object) -> None:
    err(f"{_colored('error:', 'red', sys.stderr)} {message}")


def fail(exc: errors.CorralError) -> int:
    """Print the one line that says what went wrong and what to do; the exit code."""
    _error_line(exc)
    return exit_code_for(exc)


def usage_error(message: str) -> NoReturn:
    """A mistake on the command line: one line, exit 2, nothing done."""
    _error_line(message)
    raise SystemExit(EXIT_USAGE)


# -- parsing -------------------------------------------------------------------------------


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (paragraphs kept); each option's default, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if action.option_strings and action.default not in (None, [], False, "", argparse.SUPPRESS):
            help += " (default: %(default)s)"
        return help


class Parser(argparse.ArgumentParser):
    """argparse with Corral's error line: one line naming the flag and where help is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        usage_error(f"{message} (see `{self.prog} --help`)")


def group(subcommands: Commands, name: str, help: str) -> Commands:
    """A command made of subcommands (`corral sandbox`); alone, it prints its help."""
    parser = subcommands.add_parser(name, help=help, description=help)
    parser.set_defaults(handler=lambda args: _help(parser))
    return parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_OK


def command(subcommands: Commands, name: str, handler: Handler, **kwargs: Any) -> Parser:
    """A subcommand running `handler`; its docstring's first paragraph is the help line."""
    doc = (handler.__doc__ or "").strip()
    summary = " ".join(doc.split("\n\n")[0].split())
    parser: Parser = subcommands.add_parser(
        name, help=summary, description=doc.replace("\n    ", "\n"), **kwargs
    )
    parser.set_defaults(handler=handler)
    return parser


def env_option(
    parser: argparse.ArgumentParser, *flags: str, env: str, help: str, **kwargs: Any
) -> None:
    """An option whose default comes from the environment variable `env` (flags win).

    argparse converts a string default with the option's `type`, so a bad value in the
    environment is refused as the flag's would be.
    """
    default = os.environ.get(env, kwargs.pop("default", None))
    parser.add_argument(*flags, default=default, help=f"{help} [env: {env}]", **kwargs)


def add_sandbox_choice(parser: argparse.ArgumentParser) -> None:
    """--template and --isolation of a command that creates a sandbox (`run`, `sandbox
    create`): what CORRAL_TEMPLATE and CORRAL_ISOLATION mean to the CLI, in one place."""
    env_option(parser, "--template", env="CORRAL_TEMPLATE", default="host", help="the template")
    env_option(
        parser, "--isolation", env="CORRAL_ISOLATION", default="auto", help="auto, namespace, …"
    )


def add_network_options(parser: argparse.ArgumentParser, *, env: bool = True) -> None:
    """--network, --allow, --bandwidth-mbit and --connections of a command that makes a
    sandbox (`run`, `sandbox create`, `job submit`)."""
    help = (
        "what the sandbox may reach: none (the default), internet (alias allow_all) or "
        "allowlist (--allow alone means allowlist)"
    )
    if env:
        env_option(parser, "--network", env="CORRAL_NETWORK", help=help)
    else:
        parser.add_argument("--network", help=help)
    add_allow(parser)
    parser.add_argument(
        "--bandwidth-mbit", type=whole(1), help="megabits per second each way; default: no cap"
    )
    parser.add_argument(
        "--connections", type=whole(1), help="connections open at once; default: the server's"
    )


def add_volume_option(parser: argparse.ArgumentParser) -> None:
    """--volume of a command that makes a sandbox (`run`, `sandbox create`, `job submit`)."""
    parser.add_argument(
        "-v",
        "--volume",
        action="append",
        default=[],
        metavar="NAME:/PATH[:ro]",
        help="mount your team's volume NAME at PATH (read-only with :ro); repeatable",
    )


def add_allow(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="ENTRY",
        help="an allowlist entry: pypi.org, *.example.com:443, 203.0.113.0/24; repeatable",
    )


def network_choice(args: argparse.Namespace) -> tuple[str, list[str]] | None:
    """(mode, allowlist entries) from --network and --allow, checked as the server checks
    them (so a typo exits 2 before any call); None when neither was given."""
    from corral.network.policy import NetworkPolicy

    if args.network is None and not args.allow:
        return None
    try:
        policy = NetworkPolicy.parse(args.network or "allowlist", args.allow)
    except InvalidRequest as exc:
        raise InvalidRequest(f"--network/--allow: {exc}") from None
    return policy.mode, list(policy.entries)


def setting_option(
    parser: argparse.ArgumentParser, *flags: str, setting: str, help: str, **kwargs: Any
) -> None:
    """An option of a command that runs Corral here (server, worker, admin): it overrides
    the `Settings` field `setting`, whose variable `Settings.load` reads (not argparse:
    each variable is read, and checked, in one place)."""
    variable = "CORRAL_" + setting.upper()
    parser.add_argument(
        *flags, dest=setting, default=None, help=f"{help} [env: {variable}]", **kwargs
    )


def env_file_option(parser: argparse.ArgumentParser) -> None:
    """--env-file of a command that runs Corral here: a file of settings (`Settings.load`)."""
    setting_option(
        parser,
        "--env-file",
        setting="env_file",
        help="CORRAL_*=VALUE lines over the environment's (server, worker: read again on SIGHUP)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The Settings of the environment and its env file (CORRAL_ENV_FILE, --env-file), with
    the `setting_option`s given on the command line."""
    from dataclasses import fields

    from corral.config import Settings

    given = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return Settings.load(None, **{k: v for k, v in given.items() if v is not None})


def number(
    kind: Callable[[str], float], *, minimum: float | None = None, what: str = "a number"
) -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) at least `minimum`, with a message that says so."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"use {minimum:g} or more, not {text}")
        return value

    return parse


def whole(minimum: int | None = None) -> Callable[[str], Any]:
    return number(int, minimum=minimum, what="a whole number")


def add_output(parser: argparse.ArgumentParser) -> None:
    env_option(
        parser,
        "-o",
        "--output",
        env="CORRAL_OUTPUT",
        default="table",
        choices=("table", "json"),
        help="table for people, json for scripts",
    )


def add_pairs(parser: argparse.ArgumentParser, *flags: str, help: str) -> None:
    """A repeatable KEY=VALUE option (`-e A=1 -e B=2`)."""
    parser.add_argument(*flags, action="append", default=[], metavar="KEY=VALUE", help=help)


def parse_pairs(pairs: Sequence[str] | None, flag: str) -> dict[str, str]:
    result = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"{flag} {pair!r} is not KEY=VALUE")
        result[key] = value
    return result


def words_after_dashes(words: Sequence[str]) -> list[str]:
    """A command's words as given after its options; a leading `--` only marks their start."""
    words = list(words)
    return words[1:] if words[:1] == ["--"] else words


def connect_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Where sandbox commands send their calls: the global options (flags, else env vars,
    else the current context)."""
    return {"server": args.server, "api_key": args.api_key, "context": args.context}


# -- showing -------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: dataclasses as dicts, times as ISO 8601."""
    from dataclasses import asdict, is_dataclass
    from datetime import datetime

    if is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> None:
    """Columns padded to their widest cell, two spaces apart, never wrapped (one line per row,
    for grep, awk and cut; a terminal folds what is wider than itself)."""
    lines = [list(header), *map(list, rows)] if header else [list(r) for r in rows]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = []
    for n, line in enumerate(lines):
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        row = "  ".join(cells).rstrip()
        text.append(_colored(row, "bold", sys.stdout) if header and n == 0 else row)
    sys.stdout.write("\n".join(text) + "\n")
    sys.stdout.flush()


def show(output: str, rows: Sequence[Any], columns: Sequence[str], *, single: bool = False) -> None:
    """Print dataclass rows as a table (the given columns) or as JSON (every field)."""
    if output == "json":
        import json

        data = plain(rows[0] if single else list(rows))
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    print_table(
        [[cell(getattr(row, c.replace(" ", "_"), "")) for c in columns] for row in rows],
        header=columns,
    )


def cell(value: Any) -> str:
    from datetime import datetime

    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "-"
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
        err("interrupted")
        raise SystemExit(EXIT_INTERRUPTED) from None
