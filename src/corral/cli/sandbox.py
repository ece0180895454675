"""`corral sandbox …`: one SDK call per subcommand (API-first: the CLI is just a client)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from corral.cli._common import (
    add_allow,
    add_network_options,
    add_output,
    add_pairs,
    add_sandbox_choice,
    add_volume_option,
    command,
    connect_kwargs,
    env_option,
    err,
    group,
    interruptible,
    network_choice,
    number,
    out,
    parse_pairs,
    plain,
    show,
    usage_error,
    warn,
    whole,
    words_after_dashes,
)
from corral.cli._stdin import add_stdin_option, stdin_source
from corral.cli.shell import add_shell_options, shell
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.cli._common import Commands, Parser
    from corral.client import Sandbox

SANDBOX_COLUMNS = (
    "sandbox_id",
    "state",
    "template",
    "isolation",
    "network",
    "expires_at",
    "state_reason",
)
_REMOTE = re.compile(r"^(sb_[0-9a-zA-Z]+):(.*)$")
STATES = "creating, running, paused, killed or failed"


@contextmanager
def _sandbox(args: argparse.Namespace, sandbox_id: str | None = None) -> Iterator[Sandbox]:
    from corral.client import Sandbox

    box = Sandbox.connect(sandbox_id or args.sandbox_id, resume=False, **connect_kwargs(args))
    try:
        yield box
    finally:
        box.close()


def create(args: argparse.Namespace) -> None:
    """Start a sandbox and print its id (`-o json`: all of it); it runs until killed or its
    timeout."""
    from corral.client import Limits, Sandbox

    network = network_choice(args)
    box = Sandbox.create(
        args.template,
        timeout=args.timeout,
        idle_timeout=args.idle_timeout,
        on_idle=args.on_idle,
        envs=parse_pairs(args.env, "-e"),
        metadata=parse_pairs(args.metadata, "--metadata"),
        isolation=args.isolation,
        limits=Limits(
            memory_mib=args.memory_mib,
            cpu=args.cpu,
            bandwidth_mbit=args.bandwidth_mbit,
            connections=args.connections,
        ),
        network={"mode": network[0], "allow": network[1]} if network else None,
        public_ports=args.public_ports,
        volumes=args.volume,
        ram_disk=args.ram_disk,
        **connect_kwargs(args),
    )
    box.close()
    if args.output == "json":
        show(args.output, [box.info], SANDBOX_COLUMNS, single=True)
    else:
        print(box.sandbox_id)  # the id alone, for `ID=$(corral sandbox create)`


def list_(args: argparse.Namespace) -> None:
    """Your team's sandboxes (by default those not killed or failed)."""
    # Not through `Sandbox.list`: the same call without the streaming stack's imports,
    # so that `corral sandbox list` starts fast (`benchmarks/cli.py`).
    from corral.client._listing import list_sandboxes

    infos = list_sandboxes(
        states=args.state, metadata=parse_pairs(args.metadata, "--metadata"), **connect_kwargs(args)
    )
    show(args.output, infos, SANDBOX_COLUMNS)


def get(args: argparse.Namespace) -> None:
    """One sandbox, whatever its state."""
    with _sandbox(args) as box:
        show(args.output, [box.info], (*SANDBOX_COLUMNS, "metadata", "volumes"), single=True)


def kill(args: argparse.Namespace) -> None:
    """Kill every process of a sandbox and delete it."""
    with _sandbox(args) as box:
        box.kill()
    out(f"killed {args.sandbox_id}")


def pause(args: argparse.Namespace) -> None:
    """Freeze a sandbox: its processes stop, its memory and files stay (with --to-disk,
    nothing of it runs and its memory is released: written to disk with its processes
    on a tier with memory snapshots, else only its files stay)."""
    with _sandbox(args) as box:
        info = box.pause(keep_memory=not args.to_disk)
    out(f"{args.sandbox_id} {info.state}")


def snapshot(args: argparse.Namespace) -> None:
    """Save a sandbox's file system as a template of your team (`--template NAME` starts
    sandboxes from it)."""
    from corral.cli.template import show_template

    with _sandbox(args) as box:
        show_template(args.output, box.snapshot(args.name, flatten=args.flatten))


def resume(args: argparse.Namespace) -> None:
    """Thaw a paused sandbox: its processes go on where they stopped."""
    with _sandbox(args) as box:
        info = box.resume()
    out(f"{args.sandbox_id} {info.state}")


def timeout(args: argparse.Namespace) -> None:
    """Move a sandbox's deadline to SECONDS from now."""
    with _sandbox(args) as box:
        info = box.set_timeout(args.seconds)
    out(f"{args.sandbox_id} expires at {info.expires_at}")


def network(args: argparse.Namespace) -> None:
    """Change what a sandbox may reach: MODE none, internet or allowlist (with --allow
    ENTRY, repeatable). Connections already open stay open."""
    mode, allow = network_choice(args) or ("none", [])
    with _sandbox(args) as box:
        info = box.update_network(mode, allow=allow)
    out(f"{args.sandbox_id} network {info.network}")


def exec_(args: argparse.Namespace) -> int:
    """Run a command in a sandbox with live output; exit with its exit code."""
    words = words_after_dashes(args.command)
    if not words:
        usage_error("say what to run: `corral sandbox exec ID -- COMMAND ARGS…`")
    options: dict[str, Any] = {
        "cwd": args.cwd or "",
        "user": args.user or "",
        "envs": parse_pairs(args.env, "-e"),
        "timeout": args.timeout,
    }
    with _sandbox(args) as box:
        if args.background:
            handle = box.commands.run(words, background=True, **options)
            handle.disconnect()
            out(handle.pid)
            return 0
        with interruptible():
            result = box.commands.run(
                words,
                on_stdout=_write(sys.stdout),
                on_stderr=_write(sys.stderr),
                input=stdin_source(args.stdin),
                raw_output=True,
                **options,
            )
    if result.reason != "exited":
        warn(f"command ended: {result.reason}", result.error or "")
    code: int = result.exit_code
    return code


def _write(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


def ps(args: argparse.Namespace) -> None:
    """The processes still running in a sandbox."""
    with _sandbox(args) as box:
        processes = box.commands.list()
    show(args.output, processes, ("pid", "tag", "background", "cmd", "argv", "started_at"))


def ls(args: argparse.Namespace) -> None:
    """List a directory in a sandbox."""
    with _sandbox(args) as box:
        entries = box.files.list(args.path, depth=args.depth)
    show(args.output, entries, ("type", "size", "modified_at", "path"))


def cat(args: argparse.Namespace) -> None:
    """Print a file of a sandbox (bytes as they are)."""
    with _sandbox(args) as box:
        data = box.files.read_bytes(args.path)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def cp(args: argparse.Namespace) -> None:
    """Copy one file into or out of a sandbox (ID:PATH names the sandbox side)."""
    source, destination = args.source, args.destination
    src, dst = _REMOTE.match(source), _REMOTE.match(destination)
    if bool(src) == bool(dst):
        usage_error("exactly one of SOURCE and DESTINATION must be ID:PATH")
    if dst:
        data = sys.stdin.buffer.read() if source == "-" else _read_local(source)
        with _sandbox(args, dst.group(1)) as box:
            entry = box.files.write(dst.group(2), data)
        err(f"wrote {entry.size} bytes to {dst.group(1)}:{entry.path}")
        return
    assert src is not None
    with _sandbox(args, src.group(1)) as box:
        data = box.files.read_bytes(src.group(2))
    if destination == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(destination).write_bytes(data)
        err(f"wrote {len(data)} bytes to {destination}")


def _read_local(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None


def metrics(args: argparse.Namespace) -> None:
    """CPU, memory and process counts of a sandbox over a range."""
    with _sandbox(args) as box:
        points = box.get_metrics(args.range)
    show(args.output, points, ("at", "cpu_percent", "memory_bytes", "memory_peak_bytes", "pids"))


def events(args: argparse.Namespace) -> None:
    """A sandbox's network events, one line each (JSON lines with -o json): DNS answers
    and refusals, connections allowed and denied, what the rate limit held back."""
    from corral.network.events import describe

    with _sandbox(args) as box, interruptible():
        expected = args.offset
        for event in box.events(offset=args.offset, follow=args.follow):
            if event.seq > expected:  # seqs have no gaps: the server's cap deleted these
                warn(
                    f"{event.seq - expected} older events were deleted (CORRAL_NETWORK_EVENTS_MAX)"
                )
            expected = event.seq + 1
            if args.output == "json":
                line = json.dumps(plain(event))
            else:
                at = event.at.strftime("%H:%M:%S.%f")[:-3] if event.at else "-"
                line = f"{event.seq:>4}  {at}  {describe(event)}"
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def url(args: argparse.Namespace) -> None:
    """A URL of PORT inside a sandbox, through the server's port proxy, with the
    sandbox's traffic token unless its ports are public."""
    with _sandbox(args) as box:
        print(box.get_url(args.port, args.path, host_form=args.host_form))


def add_commands(commands: Commands) -> None:
    sub = group(commands, "sandbox", "Create, inspect and use sandboxes on the server.")

    def with_id(name: str, handler: Callable[[argparse.Namespace], Any]) -> Parser:
        p = command(sub, name, handler)
        p.add_argument("sandbox_id", metavar="ID", help="the sandbox's id (`corral sandbox list`)")
        return p

    p = command(sub, "create", create)
    add_sandbox_choice(p)
    env_option(
        p,
        "--timeout",
        env="CORRAL_SANDBOX_TIMEOUT",
        default="300",
        type=whole(1),
        help="lifetime in seconds",
    )
    env_option(
        p,
        "--idle-timeout",
        env="CORRAL_IDLE_TIMEOUT",
        default="0",
        type=whole(0),
        help="seconds idle before --on-idle; 0: never",
    )
    env_option(
        p,
        "--on-idle",
        env="CORRAL_ON_IDLE",
        default="pause",
        choices=("pause", "kill"),
        help="what idleness does",
    )
    add_pairs(p, "-e", "--env", help="an environment variable; repeatable")
    add_pairs(p, "-m", "--metadata", help="a metadata entry; repeatable")
    env_option(
        p,
        "--memory-mib",
        env="CORRAL_MEMORY_MIB",
        type=whole(1),
        help="memory limit; default: the server's",
    )
    env_option(
        p,
        "--cpu",
        env="CORRAL_CPU",
        type=number(float, minimum=0.01),
        help="CPU cores; default: the server's",
    )
    add_network_options(p)
    add_volume_option(p)
    p.add_argument(
        "--public-ports",
        action="store_true",
        help="anyone may reach its ports through the server (default: with its token)",
    )
    p.add_argument(
        "--ram-disk",
        action="store_true",
        help="what it writes stays in memory (counted against --memory-mib), not on a disk",
    )
    add_output(p)

    p = command(sub, "list", list_)
    p.add_argument("--state", action="append", default=[], help=f"{STATES}; repeatable")
    add_pairs(p, "-m", "--metadata", help="KEY=VALUE: only sandboxes with it; repeatable")
    add_output(p)

    add_output(with_id("get", get))
    with_id("kill", kill)
    p = with_id("pause", pause)
    p.add_argument(
        "--to-disk",
        action="store_true",
        help="release its memory: kept on disk with its processes where the tier has memory "
        "snapshots (gvisor), else only its files are kept and resume boots it",
    )
    with_id("resume", resume)
    p = with_id("snapshot", snapshot)
    p.add_argument("--name", required=True, help="the template to make")
    p.add_argument(
        "--flatten",
        action="store_true",
        help="merge its layers into one (slower to make; independent of its template's)",
    )
    add_output(p)
    p = with_id("network", network)
    p.add_argument("network", metavar="MODE", help="none, internet (alias allow_all) or allowlist")
    add_allow(p)
    p = with_id("timeout", timeout)
    p.add_argument("seconds", type=whole(1), metavar="SECONDS", help="kill it this long from now")

    p = with_id("exec", exec_)
    p.add_argument("--cwd", help="the working directory; default /workspace")
    p.add_argument(
        "--user", help="who runs it: root, user or a user of the template; default its user"
    )
    add_pairs(p, "-e", "--env", help="an environment variable; repeatable")
    env_option(
        p,
        "--timeout",
        env="CORRAL_EXEC_TIMEOUT",
        type=number(float, minimum=0),
        help="seconds; default none",
    )
    p.add_argument("--background", action="store_true", help="start it, print its pid, return")
    add_stdin_option(p)
    p.add_argument(
        "command", nargs=argparse.REMAINDER, metavar="COMMAND", help="the program and its arguments"
    )

    add_shell_options(with_id("shell", shell))

    add_output(with_id("ps", ps))
    p = with_id("ls", ls)
    p.add_argument("path", nargs="?", default=".", help="relative to /workspace")
    p.add_argument("--depth", type=whole(1), default=1, help="levels to descend")
    add_output(p)
    p = with_id("cat", cat)
    p.add_argument("path", help="relative to /workspace")

    p = command(sub, "cp", cp)
    p.add_argument("source", metavar="SOURCE", help="LOCAL, or ID:PATH in a sandbox; - is stdin")
    p.add_argument("destination", metavar="DESTINATION", help="ID:PATH or LOCAL; - is stdout")

    p = with_id("events", events)
    p.add_argument("-f", "--follow", action="store_true", help="until the sandbox ends")
    p.add_argument(
        "--offset", type=whole(0), default=0, help="the first event: 0, or an event's seq + 1"
    )
    add_output(p)
    p = with_id("url", url)
    p.add_argument("port", type=whole(1), metavar="PORT", help="a TCP port inside the sandbox")
    p.add_argument("path", nargs="?", default="/", help="the path on that port; default /")
    p.add_argument(
        "--host-form",
        action="store_true",
        help="http://PORT-ID.DOMAIN/ (needs DNS for the server's ports domain) instead of "
        "SERVER/sandboxes/ID/ports/PORT/",
    )

    p = with_id("metrics", metrics)
    p.add_argument("--range", choices=("10m", "2h", "24h"), default="10m", help="how far back")
    add_output(p)
