"""`corral run`: create a sandbox, upload files, run one command with live output, destroy."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from corral.cli._common import (
    add_network_options,
    add_pairs,
    add_sandbox_choice,
    add_volume_option,
    command,
    connect_kwargs,
    env_option,
    interruptible,
    network_choice,
    number,
    parse_pairs,
    usage_error,
    warn,
    words_after_dashes,
)
from corral.cli._stdin import add_stdin_option, stdin_source
from corral.errors import InvalidRequest

# The sandbox of a command without a timeout lives at most this long.
DEFAULT_LIFETIME = 3600

if TYPE_CHECKING:
    from corral.cli._common import Commands


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


def run(args: argparse.Namespace) -> int:
    """Create a sandbox, run COMMAND in it with live output, destroy it; exit with its code."""
    words = words_after_dashes(args.command)
    if not words:
        usage_error("say what to run: `corral run -- COMMAND ARGS…`")
    from corral.client import Limits, Sandbox

    network = network_choice(args)
    envs = parse_pairs(args.env, "-e")
    uploads = _files(args.file)
    timeout = args.timeout
    lifetime = math.ceil(timeout) + 30 if timeout else DEFAULT_LIFETIME
    with (
        interruptible(),
        Sandbox.create(
            args.template,
            isolation=args.isolation,
            envs=envs,
            metadata=parse_pairs(args.metadata, "--metadata"),
            timeout=lifetime,
            limits=Limits(bandwidth_mbit=args.bandwidth_mbit, connections=args.connections),
            network={"mode": network[0], "allow": network[1]} if network else None,
            volumes=args.volume,
            **connect_kwargs(args),
        ) as box,
    ):
        for data, remote in uploads:
            box.files.write(remote, data)
        result = box.commands.run(
            words,
            timeout=timeout,
            on_stdout=_out,
            on_stderr=_err,
            input=stdin_source(args.stdin),
            raw_output=True,
        )
    if result.reason != "exited":
        warn(f"command ended: {result.reason}", result.error or "")
    return result.exit_code


def add_commands(commands: Commands) -> None:
    p = command(commands, "run", run)
    add_sandbox_choice(p)
    env_option(
        p,
        "--timeout",
        env="CORRAL_RUN_TIMEOUT",
        type=number(float, minimum=0),
        help="seconds before the command is killed",
    )
    add_pairs(p, "-e", "--env", help="an environment variable; repeatable")
    p.add_argument(
        "-f", "--file", action="append", default=[], metavar="LOCAL:REMOTE", help="uploaded first"
    )
    add_pairs(p, "-m", "--metadata", help="a metadata entry; repeatable")
    add_network_options(p)
    add_volume_option(p)
    add_stdin_option(p)
    p.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command and its arguments"
    )
