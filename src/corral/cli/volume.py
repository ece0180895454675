"""`corral volume …`: your team's named volumes, one SDK call per subcommand."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from corral.cli._common import add_output, command, connect_kwargs, group, out, show, whole

if TYPE_CHECKING:
    from corral.cli._common import Commands

VOLUME_COLUMNS = ("name", "size_mib", "used_bytes", "created_at")


def create(args: argparse.Namespace) -> None:
    """Create an empty volume of at most --size-mib MiB."""
    from corral.client import Volume

    info = Volume.create(args.name, size_mib=args.size_mib, **connect_kwargs(args))
    if args.output == "json":
        show(args.output, [info], VOLUME_COLUMNS, single=True)
    else:
        out(f"created volume {info.name} ({info.size_mib} MiB)")


def list_(args: argparse.Namespace) -> None:
    """Your team's volumes."""
    from corral.client import Volume

    show(args.output, Volume.list(**connect_kwargs(args)), VOLUME_COLUMNS)


def get(args: argparse.Namespace) -> None:
    """One volume of your team."""
    from corral.client import Volume

    show(args.output, [Volume.get(args.name, **connect_kwargs(args))], VOLUME_COLUMNS, single=True)


def rm(args: argparse.Namespace) -> None:
    """Delete a volume and its data (refused while a sandbox has it mounted)."""
    from corral.client import Volume

    Volume.delete(args.name, **connect_kwargs(args))
    out(f"deleted volume {args.name}")


def add_commands(commands: Commands) -> None:
    sub = group(
        commands,
        "volume",
        "Named volumes: persistent directories for sandboxes and jobs (--volume NAME:/PATH).",
    )
    p = command(sub, "create", create)
    p.add_argument("name", metavar="NAME", help="1-63 lower-case letters, digits, '.', '_', '-'")
    p.add_argument(
        "--size-mib", type=whole(1), required=True, help="its size bound (writes past it: ENOSPC)"
    )
    add_output(p)
    add_output(command(sub, "list", list_))
    p = command(sub, "get", get)
    p.add_argument("name", metavar="NAME", help="the volume's name")
    add_output(p)
    p = command(sub, "rm", rm)
    p.add_argument("name", metavar="NAME", help="the volume's name")
