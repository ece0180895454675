"""The guest agent that runs inside every sandbox, and the host's connection to it.

``agent.py``, the modules it imports and ``protocol.py`` are copied into each sandbox
(`AGENT_FILES`, from `agent_source_dir`) and run there with the sandbox's own Python,
standard library only. The host talks to the agent through `GuestConnection`.
"""

from __future__ import annotations

from pathlib import Path

from corral.guest.client import (
    CommandOutput,
    EntryInfo,
    ExecResult,
    GuestConnection,
    GuestProcess,
    GuestStream,
    GuestWatch,
    OutputChunk,
    ProcessInfo,
    WatchEvent,
)

# Every file the agent imports: a sandbox has these and the standard library, nothing else.
AGENT_FILES = (
    "agent.py",
    "agent_channels.py",
    "agent_command.py",
    "agent_connect.py",
    "agent_exec.py",
    "agent_files.py",
    "agent_move.py",
    "agent_pty.py",
    "agent_watch.py",
    "protocol.py",
    "agent_sudo.py",
    "sudo.py",  # not the agent's: the `base` template's /usr/bin/sudo runs it
    "vm_boot.py",  # a microVM's boot, which then runs the agent in its process
)


def agent_source_dir() -> Path:
    """The directory holding `AGENT_FILES`, to copy into a sandbox."""
    return Path(__file__).resolve().parent


__all__ = [
    "AGENT_FILES",
    "CommandOutput",
    "EntryInfo",
    "ExecResult",
    "GuestConnection",
    "GuestProcess",
    "GuestStream",
    "GuestWatch",
    "OutputChunk",
    "ProcessInfo",
    "WatchEvent",
    "agent_source_dir",
]
