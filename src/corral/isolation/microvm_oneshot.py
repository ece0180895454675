"""One-shot sandboxes (`Entrypoint`) on the microvm tier: the guest runs the command, not the agent.

The guest's boot (`corral.guest.vm_boot`) reads the command, its environment, workdir
and seed files from the configuration disk, writes the files and runs the command as
the template's user in a session of its own, stdin /dev/null, its stdout and stderr
pipes that the guest's PID 1 copies to two virtio-serial ports: `corral.agent` (QEMU's
stdout, the launcher's: `STDOUT_CHARDEV`) and `corral.stderr` (QEMU's stderr). When the
command ends, the guest writes its status (128+N for a death by signal N, as on
namespace) on a third port, `corral.exit` (a file of the footprint), and stops; the
launcher's shell (`microvm_shares.launcher_argv`) exits with that status. So the caller
sees what it sees on the namespace tier: the output on the launcher's pipes, the status
as its exit code.

Writes to a port return once QEMU has handed the data to the host (virtio-console waits
for the buffer back), so nothing written before the status is lost when the guest stops.
A timeout, an output limit or a kill stops QEMU itself (the launcher's child), and every
process of the guest with it. Other signals go to the guest: `EntryProcess.signal` writes
them to a FIFO of the footprint that QEMU reads (`signal_fifo`) into the port
`corral.signal`, where the guest's PID 1 reads them and signals the command or its group.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.isolation.backend import Entrypoint
from corral.isolation.footprint import Footprint

EXIT_FILE = "exit"
# The agent's port carries the command's stdout, to QEMU's stdout as a file: not `stdio`,
# which closes both ways at the end of QEMU's stdin (a one-shot's is closed at once), and
# the guest's writes to a port closed on the host wait forever.
STDOUT_CHARDEV = "file,id=agent,path=/dev/stdout"
# What the guest writes on the command's stderr (then status 1) when it cannot exec it:
# the prefix `EntryProcess` turns into "command not found" (127) or "not executable" (126).
EXEC_FAILURE = b"corral-vm: execvp "


def fields(entrypoint: Entrypoint | None) -> tuple[list[str], list[str]]:
    """The command's argv (none: the agent), and its seed files as the guest's boot reads
    them: a count, then path, octal mode and hex content of each."""
    if entrypoint is None:
        return [], ["0"]
    files = [str(len(entrypoint.files))]
    for seed in entrypoint.files:
        files += [seed.path, f"{seed.mode & 0o7777:o}", seed.content.hex()]
    return list(entrypoint.argv), files


def qemu_args(footprint: Footprint) -> list[str]:
    """The ports of the command's stderr (QEMU's), of its status (a footprint file) and of
    the signals sent to it (`signal_fifo`, which must exist: `make_signal_fifo`)."""
    return [
        "-chardev", "file,id=corral-stderr,path=/dev/stderr",
        "-device", "virtserialport,chardev=corral-stderr,name=corral.stderr",
        "-chardev", f"file,id=corral-exit,path={exit_file(footprint)}",
        "-device", "virtserialport,chardev=corral-exit,name=corral.exit",
        "-chardev", f"pipe,id=corral-signal,path={signal_fifo(footprint)}",
        "-device", "virtserialport,chardev=corral-signal,name=corral.signal",
    ]  # fmt: skip


def make_signal_fifo(footprint: Footprint) -> None:
    os.mkfifo(signal_fifo(footprint), 0o600)


def signal_fifo(footprint: Footprint) -> str:
    """Where `EntryProcess.signal` writes `SIGNUM GROUP` lines: the guest's PID 1 reads
    them on its port `corral.signal` and signals the command (its group with GROUP 1).
    A FIFO that QEMU holds open both ways (its `pipe` chardev), so the port is always
    connected: a socket's port hangs up while no client is there, and the guest's
    select() would spin on it."""
    return str(footprint.path / "signal")


def exit_file(footprint: Footprint) -> Path:
    return footprint.path / EXIT_FILE
