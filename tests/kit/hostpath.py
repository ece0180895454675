"""A PATH like this host's with some commands left out: a host that lacks a tool, for the
tests of what Corral says is missing (`corral doctor`, a tier the host lacks)."""

from __future__ import annotations

import os
from pathlib import Path


def path_without(bin_dir: Path, *tools: str) -> str:
    """A PATH of one directory, `bin_dir`, holding links to every command of this host's
    PATH but `tools` (the first of each name, as the shell would find it)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for directory in os.environ["PATH"].split(os.pathsep):
        if not Path(directory).is_dir():
            continue
        for tool in Path(directory).iterdir():
            link = bin_dir / tool.name
            if tool.name not in tools and not link.exists():
                link.symlink_to(tool)
    return str(bin_dir)
