"""`corral vm …`: the Agent/krunvm seed's vms, one SDK call (or a few) per subcommand.

A vm is a named sandbox definition of a language kept by the server (`corral.vms`);
`vm run` starts it if it is stopped, uploads --file to /in, runs the command there with
live output, downloads /out with --out, and exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    add_output,
    command,
    connect_kwargs,
    env_option,
    err,
    fail,
    group,
    interruptible,
    number,
    out,
    show,
    usage_error,
    warn,
    whole,
)
from corral.errors import CorralError

if TYPE_CHECKING:
    from corral.cli._common import Commands
    from corral.client import VmInfo

COLUMNS = (
    "name",
    "language",
    "state",
    "isolation",
    "cpu",
    "memory_mib",
    "network",
    "persist",
    "sandbox_id",
)


def create(args: argparse.Namespace) -> int:
    """Create a vm of a language; the first vm of a language builds its template (shown
    as it goes), later ones reuse it."""
    from corral.cli.template import Progress
    from corral.client import Vm

    # With -o json, stdout holds only the vm's JSON: the progress goes to stderr.
    progress = Progress(sys.stderr if args.output == "json" else None)
    with interruptible():
        try:
            info = Vm.create(
                args.name,
                language=args.language,
                cpu=args.cpu,
                memory_mib=args.mem,
                network=args.network,
                persist=args.persist,
                persist_mib=args.persist_mib,
                isolation=args.isolation,
                on_build_logs=progress,
                **connect_kwargs(args),
            )
        finally:
            progress.close()
    if args.output == "json":
        show(args.output, [info], (), single=True)
    else:
        err(f"created vm {info.name} ({info.language}, template {info.template})")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Run a command in a vm (started if stopped) from /in, with live output; --file
    uploads files to /in first, --out DIR downloads /out after. Exits with its code."""
    from corral.client import Vm

    head, words = _split(args.words)
    if not words:
        usage_error("say what to run: `corral vm run NAME [--file F] -- COMMAND ARGS…`")
    # Options go between NAME and `--` (argparse would take them for the command's).
    options = _RUN_OPTIONS.parse_args(head)
    with interruptible():
        result = Vm.run(
            options.name,
            words,
            files=options.file,
            out_dir=options.out,
            timeout=options.timeout or None,
            on_stdout=_write(sys.stdout),
            on_stderr=_write(sys.stderr),
            raw_output=True,
            **connect_kwargs(args),
        )
    if result.reason != "exited":
        warn(f"command ended: {result.reason}", result.error or "")
    code: int = result.exit_code
    return code


def _split(words: list[str]) -> tuple[list[str], list[str]]:
    """The words before `--` and the command after it."""
    if "--" not in words:
        return words, []
    at = words.index("--")
    return words[:at], words[at + 1 :]


def _run_options() -> argparse.ArgumentParser:
    from corral.cli._common import Parser

    parser = Parser(prog="corral vm run", add_help=False)
    parser.add_argument("name", metavar="NAME")
    parser.add_argument(
        "--file", action="append", default=[], metavar="FILE", help="upload to /in; repeatable"
    )
    parser.add_argument("--out", metavar="DIR", help="download /out here after the command")
    parser.add_argument("--timeout", type=number(float, minimum=0), help="seconds; default none")
    return parser


_RUN_OPTIONS = _run_options()


def _write(stream: Any) -> Any:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


@dataclass(frozen=True)
class ExecResult:
    """One vm's part of `vm exec`: how its command ended, or why it could not run."""

    name: str
    exit_code: int | None
    stdout: str
    stderr: str
    error: str | None = None


def exec_(args: argparse.Namespace) -> int:
    """Run one command in several vms (NAME… or --all), each started if stopped, one
    after the other: --hello runs each language's hello world. Prints each vm's result;
    exits 0 if every command exited 0."""
    from corral.client import Vm
    from corral.images.languages import language_base

    names, hello, every, words = _exec_words(args.words)
    hello, every = hello or args.hello, every or args.all
    if hello == bool(words):
        usage_error("say what to run: --hello, or `-- COMMAND ARGS…`")
    if every == bool(names):
        usage_error("name the vms (NAME …) or give --all")
    vms = Vm.list(all=True, **connect_kwargs(args)) if every else None
    targets = [(vm.name, vm.language) for vm in vms] if vms is not None else []
    if vms is None:
        targets = [(name, Vm.get(name, **connect_kwargs(args)).language) for name in names]
    results: list[ExecResult] = []
    with interruptible():
        for name, language in targets:
            command = language_base(language).hello if hello else words
            try:
                ran = Vm.run(name, command, timeout=args.timeout or None, **connect_kwargs(args))
            except CorralError as exc:
                results.append(ExecResult(name, None, "", "", str(exc)))
                continue
            results.append(ExecResult(name, ran.exit_code, ran.stdout, ran.stderr, ran.error))
    if args.output == "json":
        show(args.output, results, ())
    else:
        for result in results:
            head = f"exit {result.exit_code}" if result.exit_code is not None else "error"
            out(f"== {result.name}: {head}")
            for text in (result.stdout, result.stderr, result.error or ""):
                if text:
                    out(text.rstrip("\n"))
    ok = all(r.exit_code == 0 for r in results)
    return EXIT_OK if ok else EXIT_ERROR


def _exec_words(words: list[str]) -> tuple[list[str], bool, bool, list[str]]:
    """`vm exec`'s words: the names and flags before `--`, the command after it."""
    before, command = _split(words)
    names, hello, every = [], False, False
    for word in before:
        if word == "--hello":
            hello = True
        elif word == "--all":
            every = True
        elif word.startswith("-"):
            usage_error(f"vm exec: unknown option {word}; put the command after `--`")
        else:
            names.append(word)
    return names, hello, every, command


def list_(args: argparse.Namespace) -> None:
    """Your team's running vms; --all: the stopped (and building) ones too."""
    from corral.client import Vm

    show(args.output, Vm.list(all=args.all, **connect_kwargs(args)), COLUMNS)


def _targets(args: argparse.Namespace) -> list[str]:
    from corral.client import Vm

    if args.all == bool(args.names):
        usage_error("name the vms (NAME …) or give --all")
    if args.all:
        return [vm.name for vm in Vm.list(all=True, **connect_kwargs(args))]
    names: list[str] = args.names
    return names


def stop(args: argparse.Namespace) -> int:
    """Stop vms (NAME… or --all): their sandboxes end; /persist stays."""
    from corral.client import Vm

    code = EXIT_OK
    for name in _targets(args):
        try:
            info: VmInfo = Vm.stop(name, **connect_kwargs(args))
        except CorralError as exc:
            code = fail(exc)
            continue
        out(f"{info.name} {info.state}")
    return code


def clean(args: argparse.Namespace) -> int:
    """Remove vms (NAME… or --all), stopping them, with their /persist volume unless
    --keep-persist (a vm created again by that name with --persist gets it back)."""
    from corral.client import Vm

    code = EXIT_OK
    for name in _targets(args):
        try:
            Vm.delete(name, keep_persist=args.keep_persist, **connect_kwargs(args))
        except CorralError as exc:
            code = fail(exc)
            continue
        out(f"removed vm {name}")
    return code


def out_(args: argparse.Namespace) -> None:
    """Download the files a running vm has in /out into DIR."""
    from corral.client import Vm

    for path in Vm.download(args.name, args.dir, **connect_kwargs(args)):
        out(path)


def add_commands(commands: Commands) -> None:
    sub = group(
        commands,
        "vm",
        "Vms: named sandboxes of a language (python, javascript, ruby, go) with /persist.",
    )
    p = command(sub, "create", create)
    p.add_argument("name", metavar="NAME", help="1-50 lower-case letters, digits, '-'")
    p.add_argument(
        "--language", required=True, help="python, javascript (node), ruby or go (golang)"
    )
    p.add_argument("--cpu", type=number(float, minimum=0), default=1.0, help="cores; default 1")
    p.add_argument("--mem", type=whole(1), default=512, metavar="MIB", help="default 512")
    p.add_argument("--network", choices=("none", "allow_all"), default="none")
    p.add_argument("--persist", action="store_true", help="a volume vm-NAME at /persist")
    p.add_argument("--persist-mib", type=whole(1), default=1024, help="its size; default 1024")
    env_option(
        p,
        "--isolation",
        env="CORRAL_ISOLATION",
        default="auto",
        help="the tier of its sandboxes: auto (the server's default), namespace, gvisor, microvm",
    )
    add_output(p)

    p = command(
        sub,
        "run",
        run,
        usage="corral vm run NAME [--file FILE]… [--out DIR] [--timeout S] -- COMMAND…",
        epilog=_RUN_OPTIONS.format_help().split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    p = command(sub, "exec", exec_, usage="corral vm exec (NAME… | --all) (--hello | -- CMD…)")
    # Also read among the words (after a NAME, argparse leaves the rest to them).
    p.add_argument("--all", action="store_true", help="every vm of your team")
    p.add_argument("--hello", action="store_true", help="each language's hello world")
    p.add_argument("--timeout", type=number(float, minimum=0), help="seconds; default none")
    add_output(p)
    p.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="NAME… -- COMMAND",
        help="the vms and what to run in each",
    )

    p = command(sub, "list", list_)
    p.add_argument("--all", action="store_true", help="the stopped vms too")
    add_output(p)
    for name, handler in (("stop", stop), ("clean", clean)):
        p = command(sub, name, handler)
        p.add_argument("names", nargs="*", metavar="NAME")
        p.add_argument("--all", action="store_true", help="every vm of your team")
        if name == "clean":
            p.add_argument("--keep-persist", action="store_true", help="keep vm-NAME")
    p = command(sub, "out", out_)
    p.add_argument("name", metavar="NAME")
    p.add_argument("dir", metavar="DIR")
