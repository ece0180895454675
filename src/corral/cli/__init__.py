"""The `corral` command: a client of the API (through the SDK), plus the server itself.

Every sandbox command is an API call any client can make; `doctor` (this host) and
`admin` (the local store) are the only ones that work locally.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from corral.cli import admin, context, install, job, run, sandbox, template, vm, volume
from corral.cli._common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    command,
    env_file_option,
    env_option,
    err,
    fail,
    print_table,
    setting_option,
    settings_from,
    warn,
    whole,
)

if TYPE_CHECKING:
    from corral.cli._common import Commands
    from corral.config import Settings
    from corral.isolation import Capabilities


class _Version(argparse.Action):
    """`--version`: the version is read (importlib.metadata) only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from corral import __version__

        print(f"corral {__version__}")
        parser.exit()


def parser() -> Parser:
    root = Parser(prog="corral", description=__doc__)
    root.set_defaults(handler=lambda args: root.print_help())
    env_option(root, "--server", env="CORRAL_SERVER", help="the API server, http://HOST:PORT")
    env_option(root, "--api-key", env="CORRAL_API_KEY", help="your team's API key")
    env_option(root, "--context", env="CORRAL_CONTEXT", help="a context of `corral context list`")
    env_option(
        root,
        "--ca-file",
        env="CORRAL_CA_FILE",
        metavar="FILE",
        help="PEM CA certificate(s) to verify an https server with (default: the system's)",
    )
    root.add_argument(
        "--version", action=_Version, nargs=0, default=None, help="print the version and exit"
    )
    commands = root.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    run.add_commands(commands)
    _add_server_commands(commands)
    sandbox.add_commands(commands)
    job.add_commands(commands)
    volume.add_commands(commands)
    template.add_commands(commands)
    vm.add_commands(commands)
    context.add_commands(commands)
    admin.add_commands(commands)
    install.add_commands(commands)
    return root


# -- the server's side: these run here, not through the API -------------------------------


def server(args: argparse.Namespace) -> int:
    """Run the API server in the foreground (Ctrl-C stops it; twice forces)."""
    import functools

    from corral.cli.demo import show
    from corral.reload import Reloader, hold_sighup
    from corral.server import serve, tls

    hold_sighup()
    _note_old_isolation()
    settings = settings_from(args)
    demo = None
    if args.demo:
        if settings.tls_self_signed and "CORRAL_CA_FILE" not in os.environ:
            # The demo's client trusts the development certificate the server makes
            # before it starts the demo; the SDK reads it from here.
            cert = settings.data_dir / "tls" / tls.SELF_SIGNED_CERT
            os.environ["CORRAL_CA_FILE"] = str(cert)
        key_file = settings.data_dir / "default.key"
        demo = functools.partial(show, key_file, os.environ.get("CORRAL_CA_FILE"))
    return serve(settings, companion=demo, reloader=Reloader(settings, lambda: settings_from(args)))


def worker(args: argparse.Namespace) -> int:
    """Run jobs from the server's store in this process, beside the server's own workers
    (Ctrl-C stops it: its running jobs go back to the queue)."""
    from corral import logs, tracing
    from corral.jobs.daemon import run_worker
    from corral.reload import Reloader, hold_sighup

    hold_sighup()
    _note_old_isolation()
    settings = settings_from(args)
    logs.configure(settings.log_level)
    tracing.configure(settings, "corral-worker")
    return run_worker(settings, reloader=Reloader(settings, lambda: settings_from(args)))


def _note_old_isolation() -> None:
    """Tell an operator who set CORRAL_ISOLATION for a server or worker (its meaning there
    until it became the CLI's alone) which variable sets that default now."""
    old = os.environ.get("CORRAL_ISOLATION")
    if old and "CORRAL_DEFAULT_ISOLATION" not in os.environ:
        warn(
            "note:",
            f"CORRAL_ISOLATION={old} only sets the tier `corral run` and `sandbox create` ask "
            "for; set CORRAL_DEFAULT_ISOLATION for this process's default tier (auto)",
        )


def doctor(args: argparse.Namespace) -> None:
    """Say which isolation tiers this host offers and on which platform, what is missing
    for the others, which network modes each can enforce, and how much memory it admits
    sandboxes to."""
    from corral import logs
    from corral.isolation import capabilities
    from corral.isolation.admission import MemoryCapacity

    settings = settings_from(args)
    logs.configure(settings.log_level)
    # `process` (no isolation) last: the tiers to pick from first.
    tiers = dict(sorted(capabilities(settings).items(), key=lambda tier: tier[0] == "process"))
    rows = []
    for name, caps in tiers.items():
        details = {k: v for k, v in caps.details.items() if k != "platform"}
        notes = caps.missing or [", ".join(f"{k}={v}" for k, v in details.items())]
        platform = str(caps.details.get("platform", "-"))
        rows.append([name, "yes" if caps.available else "no", platform, notes[0]])
        rows.extend(["", "", "", note] for note in notes[1:])
    print_table(rows, header=("backend", "available", "platform", "why not / details"))
    print()
    print_table(_network_rows(settings, tiers), header=("backend", "network", "for the others"))
    print(
        f"sandbox memory capacity per process: {MemoryCapacity.of_host(settings).describe()} "
        "(CORRAL_MEMORY_RESERVE_MIB, CORRAL_MEMORY_OVERCOMMIT)"
    )
    print()
    print_table(_pool_rows(settings), header=("warm pool", "template", "size", "kept"))


def _network_rows(settings: Settings, tiers: dict[str, Capabilities]) -> list[list[str]]:
    """Per tier: the network modes it enforces on this host (the tier's own answer, the
    one that refuses a sandbox) and what to install for the modes it lacks."""
    from corral.isolation.registry import backend_class
    from corral.network.policy import MODES

    rows = []
    for name, caps in tiers.items():
        modes = backend_class(name)(settings).network_modes()
        if set(MODES) <= modes:
            hint = "-"
        elif needs := caps.details.get("network_needs"):
            hint = str(needs)
        else:
            hint = f"the {name} tier has no network of its own: use another tier"
        if not caps.available:
            hint = "the tier is unavailable (see above)"
        rows.append([name, ", ".join(m for m in MODES if m in modes), hint])
    return rows


def _pool_rows(settings: Settings) -> list[list[str]]:
    """The warm pools `corral server` keeps (CORRAL_POOL_SIZE, CORRAL_POOLS): per tier and
    template its size, and whether it can be kept on this host."""
    from corral.isolation.registry import backend_class, resolve

    sizes, missing = settings.pool_plan(lambda name: resolve(name, settings).name)
    rows = []
    for (tier, kind), size in sizes.items():
        if kind == "host" and not backend_class(tier).host_template:
            kept = f"no: the {tier} tier cannot run the host template"
        elif kind == "base":
            kept = "yes, from the first create of the server's base on this tier"
        else:
            kept = "yes"
        rows.append([tier, kind, str(size), kept if size else "no (size 0)"])
    rows.extend([tier, kind, "-", f"no: {why}"] for (tier, kind), why in missing.items())
    return rows


def _add_server_commands(commands: Commands) -> None:
    p = command(commands, "server", server)
    env_file_option(p)
    setting_option(p, "--host", setting="host", help="address to listen on")
    setting_option(p, "--port", setting="port", type=whole(0), help="port to listen on")
    setting_option(p, "--data-dir", setting="data_dir", type=Path, help="the store and default key")
    setting_option(
        p, "--pool-size", setting="pool_size", type=whole(0), help="sandboxes kept ready"
    )
    setting_option(
        p, "--pools", setting="pools", help="more warm pools: TIER:TEMPLATE=SIZE,… (host or base)"
    )
    setting_option(
        p,
        "--http-server",
        setting="http_server",
        help="auto, pyvoy (native gRPC too) or uvicorn (Connect and gRPC-Web only)",
    )
    setting_option(p, "--log-level", setting="log_level", help="debug, info, warning or error")
    setting_option(
        p,
        "--workers",
        setting="job_workers",
        type=whole(0),
        help="jobs run at once in this process (0: none)",
    )
    setting_option(
        p, "--tls-cert", setting="tls_cert", metavar="FILE", help="serve HTTPS: PEM certificate"
    )
    setting_option(
        p, "--tls-key", setting="tls_key", metavar="FILE", help="the certificate's PEM key"
    )
    setting_option(
        p,
        "--tls-self-signed",
        setting="tls_self_signed",
        action="store_const",
        const=True,
        help="serve HTTPS with a development pair made in DATA_DIR/tls (its fingerprint is logged)",
    )
    _metrics_options(p)
    p.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="once up, run a first command through the API and say what next",
    )

    p = command(commands, "worker", worker)
    env_file_option(p)
    setting_option(p, "--data-dir", setting="data_dir", type=Path, help="the store the server uses")
    setting_option(p, "--workers", setting="job_workers", type=whole(0), help="jobs run at once")
    setting_option(p, "--log-level", setting="log_level", help="debug, info, warning or error")
    _metrics_options(p)

    command(commands, "doctor", doctor)


def _metrics_options(p: argparse.ArgumentParser) -> None:
    setting_option(
        p,
        "--metrics-port",
        setting="metrics_port",
        type=whole(0),
        help="serve Prometheus metrics on this port, without a key (0: none)",
    )
    setting_option(p, "--metrics-host", setting="metrics_host", help="address of the metrics port")


def main(argv: Sequence[str] | None = None) -> None:
    from corral.errors import CorralError

    code: int | str | None = EXIT_OK
    try:
        args = parser().parse_args(argv)
        if getattr(args, "ca_file", None):
            # The SDK reads it where it reads CORRAL_SERVER's siblings: one resolution
            # (ClientSettings.resolve) for every command, flag or variable alike.
            os.environ["CORRAL_CA_FILE"] = args.ca_file
        code = args.handler(args)
    except SystemExit as exc:
        code = exc.code
    except CorralError as exc:
        code = fail(exc)
    except KeyboardInterrupt:
        err("interrupted")
        code = EXIT_INTERRUPTED
    _exit(code)


def _exit(code: int | str | None) -> None:
    """Leave without finalizing the interpreter.

    The HTTP client's Rust runtime (pyqwest, under connectrpc) keeps worker threads
    that can panic while Python tears itself down, aborting about one short-lived process
    in twenty with SIGABRT after all work is done. A CLI has nothing left to finalize once
    its output is flushed, so it exits directly with its code.
    """
    if isinstance(code, str):
        err(code)
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code or 0)
