"""`corral sandbox …`: one SDK call per subcommand (API-first: the CLI is just a client)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal, TextIO, cast

import typer

from corral.cli._common import (
    OUTPUT_OPTION,
    Output,
    connect_options,
    err,
    interruptible,
    out,
    parse_pairs,
    show,
)
from corral.cli._stdin import StdinOption, stdin_source
from corral.client import Limits, Sandbox
from corral.errors import InvalidRequest

app = typer.Typer(no_args_is_help=True, help="Create, inspect and use sandboxes on the server.")

SANDBOX_COLUMNS = ("sandbox_id", "state", "template", "isolation", "expires_at", "state_reason")
_REMOTE = re.compile(r"^(sb_[0-9a-zA-Z]+):(.*)$")

SandboxId = Annotated[str, typer.Argument(help="the sandbox's id (`corral sandbox list`)")]


@contextmanager
def _sandbox(ctx: typer.Context, sandbox_id: str) -> Iterator[Sandbox]:
    box = Sandbox.connect(sandbox_id, resume=False, **connect_options(ctx).kwargs())
    try:
        yield box
    finally:
        box.close()


@app.command()
def create(
    ctx: typer.Context,
    template: Annotated[str, typer.Option(envvar="CORRAL_TEMPLATE")] = "host",
    isolation: Annotated[str, typer.Option(envvar="CORRAL_ISOLATION")] = "auto",
    timeout: Annotated[
        int, typer.Option(envvar="CORRAL_SANDBOX_TIMEOUT", min=1, help="lifetime in seconds")
    ] = 300,
    idle_timeout: Annotated[
        int,
        typer.Option(
            envvar="CORRAL_IDLE_TIMEOUT", min=0, help="seconds idle before on-idle; 0: never"
        ),
    ] = 0,
    on_idle: Annotated[str, typer.Option(envvar="CORRAL_ON_IDLE", help="pause or kill")] = "pause",
    env: Annotated[list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE")] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE")
    ] = None,
    memory_mib: Annotated[
        int | None, typer.Option(envvar="CORRAL_MEMORY_MIB", min=1, help="default: the server's")
    ] = None,
    cpu: Annotated[float | None, typer.Option(envvar="CORRAL_CPU")] = None,
    output: Output = OUTPUT_OPTION,
) -> None:
    """Start a sandbox and print its id (`-o json`: all of it); it runs until killed or its
    timeout."""
    box = Sandbox.create(
        template,
        timeout=timeout,
        idle_timeout=idle_timeout,
        on_idle=cast(Literal["pause", "kill"], on_idle),
        envs=parse_pairs(env, "-e"),
        metadata=parse_pairs(metadata, "--metadata"),
        isolation=isolation,
        limits=Limits(memory_mib=memory_mib, cpu=cpu),
        **connect_options(ctx).kwargs(),
    )
    box.close()
    if output is Output.json:
        show(output, [box.info], SANDBOX_COLUMNS, single=True)
    else:
        print(box.sandbox_id)  # the id alone, for `ID=$(corral sandbox create)`


@app.command("list")
def list_(
    ctx: typer.Context,
    state: Annotated[
        list[str] | None, typer.Option(help="creating, running, paused, killed or failed")
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", "-m", help="KEY=VALUE")
    ] = None,
    output: Output = OUTPUT_OPTION,
) -> None:
    """Your team's sandboxes (by default those not killed or failed)."""
    infos = Sandbox.list(
        states=state or (),
        metadata=parse_pairs(metadata, "--metadata"),
        **connect_options(ctx).kwargs(),
    )
    show(output, infos, SANDBOX_COLUMNS)


@app.command()
def get(ctx: typer.Context, sandbox_id: SandboxId, output: Output = OUTPUT_OPTION) -> None:
    """One sandbox, whatever its state."""
    with _sandbox(ctx, sandbox_id) as box:
        show(output, [box.info], (*SANDBOX_COLUMNS, "metadata"), single=True)


@app.command()
def kill(ctx: typer.Context, sandbox_id: SandboxId) -> None:
    """Kill every process of a sandbox and delete it."""
    with _sandbox(ctx, sandbox_id) as box:
        box.kill()
    out.print(f"killed {sandbox_id}")


@app.command()
def pause(ctx: typer.Context, sandbox_id: SandboxId) -> None:
    """Freeze a sandbox: its processes stop, its memory and files stay."""
    with _sandbox(ctx, sandbox_id) as box:
        info = box.pause()
    out.print(f"{sandbox_id} {info.state}")


@app.command()
def resume(ctx: typer.Context, sandbox_id: SandboxId) -> None:
    with _sandbox(ctx, sandbox_id) as box:
        info = box.resume()
    out.print(f"{sandbox_id} {info.state}")


@app.command()
def timeout(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    seconds: Annotated[int, typer.Argument(help="kill it this many seconds from now")],
) -> None:
    """Move a sandbox's deadline to SECONDS from now."""
    with _sandbox(ctx, sandbox_id) as box:
        info = box.set_timeout(seconds)
    out.print(f"{sandbox_id} expires at {info.expires_at}")


@app.command(context_settings={"allow_interspersed_args": False})
def exec(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    command: Annotated[list[str], typer.Argument(help="the program and its arguments")],
    cwd: Annotated[str | None, typer.Option(help="default /workspace")] = None,
    env: Annotated[list[str] | None, typer.Option("-e", "--env", help="KEY=VALUE")] = None,
    timeout: Annotated[
        float | None,
        typer.Option(envvar="CORRAL_EXEC_TIMEOUT", min=0, help="seconds; default none"),
    ] = None,
    background: Annotated[bool, typer.Option(help="start it, print its pid, return")] = False,
    stdin: StdinOption = None,
) -> None:
    """Run a command in a sandbox with live output; exit with its exit code."""
    if command[:1] == ["--"]:  # `exec ID -- CMD`: after ID every word is the command's
        command = command[1:]
    with _sandbox(ctx, sandbox_id) as box:
        if background:
            handle = box.commands.run(
                command,
                background=True,
                cwd=cwd or "",
                envs=parse_pairs(env, "-e"),
                timeout=timeout,
            )
            handle.disconnect()
            out.print(handle.pid)
            return
        with interruptible():
            result = box.commands.run(
                command,
                cwd=cwd or "",
                envs=parse_pairs(env, "-e"),
                timeout=timeout,
                on_stdout=_write(sys.stdout),
                on_stderr=_write(sys.stderr),
                input=stdin_source(stdin),
                raw_output=True,
            )
    if result.reason != "exited":
        err.print(f"[yellow]command ended: {result.reason}[/yellow] {result.error or ''}")
    raise typer.Exit(result.exit_code)


def _write(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


@app.command()
def ps(ctx: typer.Context, sandbox_id: SandboxId, output: Output = OUTPUT_OPTION) -> None:
    """The processes still running in a sandbox."""
    with _sandbox(ctx, sandbox_id) as box:
        show(output, box.commands.list(), ("pid", "tag", "background", "cmd", "argv", "started_at"))


@app.command()
def ls(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    path: Annotated[str, typer.Argument(help="relative to /workspace")] = ".",
    depth: Annotated[int, typer.Option(help="levels to descend")] = 1,
    output: Output = OUTPUT_OPTION,
) -> None:
    """List a directory in a sandbox."""
    with _sandbox(ctx, sandbox_id) as box:
        show(output, box.files.list(path, depth=depth), ("type", "size", "modified_at", "path"))


@app.command()
def cat(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    path: Annotated[str, typer.Argument(help="relative to /workspace")],
) -> None:
    """Print a file of a sandbox (bytes as they are)."""
    with _sandbox(ctx, sandbox_id) as box:
        data = box.files.read_bytes(path)
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@app.command()
def cp(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="LOCAL, or ID:PATH in a sandbox; - is stdin")],
    destination: Annotated[str, typer.Argument(help="ID:PATH or LOCAL; - is stdout")],
) -> None:
    """Copy one file into or out of a sandbox (ID:PATH names the sandbox side)."""
    src, dst = _REMOTE.match(source), _REMOTE.match(destination)
    if bool(src) == bool(dst):
        raise InvalidRequest("exactly one of SOURCE and DESTINATION must be ID:PATH")
    if dst:
        data = sys.stdin.buffer.read() if source == "-" else _read_local(source)
        with _sandbox(ctx, dst.group(1)) as box:
            entry = box.files.write(dst.group(2), data)
        err.print(f"wrote {entry.size} bytes to {dst.group(1)}:{entry.path}")
        return
    assert src is not None
    with _sandbox(ctx, src.group(1)) as box:
        data = box.files.read_bytes(src.group(2))
    if destination == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(destination).write_bytes(data)
        err.print(f"wrote {len(data)} bytes to {destination}")


def _read_local(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None


@app.command()
def metrics(
    ctx: typer.Context,
    sandbox_id: SandboxId,
    range: Annotated[str, typer.Option("--range", help="10m, 2h or 24h")] = "10m",
    output: Output = OUTPUT_OPTION,
) -> None:
    """CPU, memory and process counts of a sandbox over a range."""
    with _sandbox(ctx, sandbox_id) as box:
        points = box.get_metrics(cast(Literal["10m", "2h", "24h"], range))
    show(output, points, ("at", "cpu_percent", "memory_bytes", "memory_peak_bytes", "pids"))
