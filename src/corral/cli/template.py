"""`corral template …`: build templates and manage them, one SDK call (`corral.Template`)
per subcommand.

    corral template build py -f Dockerfile .             # progress, then exit 0 when ready
    corral template build base --debian bookworm --package python3
    corral template build app --recipe recipe.yaml --no-follow
    corral template logs py --follow
    corral template list | get NAME | rm NAME | cancel NAME

A build that does not end ready exits 1 (failed) or 125 (cancelled), with the failed
step and the tail of its log on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from corral.cli._common import (
    EXIT_CANCELED,
    EXIT_ERROR,
    add_allow,
    add_output,
    add_pairs,
    cell,
    command,
    connect_kwargs,
    env_option,
    err,
    group,
    interruptible,
    network_choice,
    number,
    parse_pairs,
    plain,
    print_table,
    show,
    whole,
)
from corral.errors import InvalidRequest

if TYPE_CHECKING:
    from corral.cli._common import Commands
    from corral.client import BuildLog, TemplateInfo

COLUMNS = ("name", "state", "source", "size_bytes", "steps_total", "steps_cached", "updated_at")
EXIT_FOR_STATE = {"ready": 0, "failed": EXIT_ERROR, "cancelled": EXIT_CANCELED}


def show_template(output: str, info: TemplateInfo) -> None:
    if output == "json":
        show(output, [info], (), single=True)
        return
    fields: list[tuple[str, object]] = [
        ("name", info.name),
        ("state", info.state),
        ("source", info.source),
        ("size", f"{info.size_bytes} bytes"),
        ("layers", len(info.layers)),
        ("steps", f"{info.steps_total} ({info.steps_cached} cached)"),
        ("env", info.env),
        ("workdir", info.workdir or "-"),
        ("user", info.user or "-"),
        ("start", info.start_cmd or "-"),
        ("ready check", info.ready_cmd or "-"),
        ("build job", info.build_job_id or "-"),
        ("sandbox limits", _limits_text(info) or "-"),
        ("sandbox network", str(info.sandbox_network or "-")),
        ("memory images", "; ".join(map(str, info.memory_images)) or "-"),
        ("created", info.created_at),
        ("updated", info.updated_at),
    ]
    if info.error:
        fields.append(("error", info.error))
    print_table([[name, cell(value)] for name, value in fields])


def _limits_text(info: TemplateInfo) -> str:
    limits = info.sandbox_limits
    return ", ".join(
        f"{name}={value:g}" for name, value in vars(limits).items() if value is not None
    )


class Progress:
    """A build's progress as it comes: each event and each line of a step's output on a
    line of its own, prefixed by its step. On a terminal the latest event also stays on
    the last line (redrawn under the output); in a pipe, plain lines only."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.status = ""  # the latest event, shown on the last line of a terminal
        self.shown = False  # whether the last line holds it now
        self.partial: dict[int, tuple[str, str]] = {}  # step: (label, output up to a newline)

    def __call__(self, entry: BuildLog) -> None:
        if entry.event is not None:
            text = _event_text(entry.event.type, entry.event.reason, entry.event.data)
            if text:
                self._line(text)
                self.status = text
        elif entry.chunk is not None:
            step = entry.chunk.step
            label = entry.label or f"step {step}"
            _, before = self.partial.pop(step, ("", ""))
            *lines, rest = (before + entry.chunk.data.decode(errors="replace")).split("\n")
            if rest:
                self.partial[step] = (label, rest)
            for line in lines:
                self._line(f"[{label}] {line}")
        self._redraw()

    def close(self) -> None:
        for label, rest in self.partial.values():
            self._line(f"[{label}] {rest}")
        self.partial.clear()
        self._clear()
        self.stream.flush()

    def _clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.shown = False

    def _line(self, text: str) -> None:
        self._clear()
        self.stream.write(text.rstrip() + "\n")

    def _redraw(self) -> None:
        if self.tty and self.status and not self.shown:
            self.stream.write(f"\033[1m{self.status}\033[0m")
            self.shown = True
        self.stream.flush()


def _event_text(kind: str, reason: str, data: dict[str, Any]) -> str:
    """An event as a progress line: the builder's own words (step i/N …, cached, pulled
    N bytes), or a job state change."""
    if kind == "state":
        return f"build {reason}".rstrip() if reason else ""
    if kind in ("network", "callback"):
        return ""
    return reason or kind


def _source(args: argparse.Namespace) -> Any:
    """The builder for the source given on the command line (exactly one)."""
    from corral.client import Template

    given = [
        flag
        for flag, value in (
            ("-f", args.file),
            ("--recipe", args.recipe),
            ("--image", args.image),
            ("--debian", args.debian),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise InvalidRequest(
            "say what to build from, once: -f DOCKERFILE [CONTEXT], --recipe FILE [CONTEXT], "
            "--image REF or --debian SUITE --package P"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    if args.package and args.debian is None:
        raise InvalidRequest("--package goes with --debian SUITE")
    if args.build_arg and args.file is None:
        raise InvalidRequest("--build-arg sets a Dockerfile's ARG: it goes with -f")
    if args.image is not None:
        return Template().from_image(args.image, args.username, args.password)
    if args.debian is not None:
        return Template().from_debian(args.debian, args.package, args.variant)
    flag, words = ("-f", args.file) if args.file is not None else ("--recipe", args.recipe)
    if len(words) > 2:
        raise InvalidRequest(f"{flag} takes a file and at most one CONTEXT directory")
    path, context = words[0], (words[1:] or ["."])[0]
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()  # noqa: SIM115
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise InvalidRequest(f"cannot read {path}: {reason}") from None
    builder = Template(file_context_path=context)
    return builder.from_dockerfile(text) if args.file is not None else builder.from_recipe(text)


def build(args: argparse.Namespace) -> int:
    """Build a template from a Dockerfile, a recipe, an image or a Debian base; follow its
    progress and exit with how it ended (0 ready)."""
    from corral.client import Template

    template = _source(args)
    if args.ready_cmd:
        template.set_ready_cmd(args.ready_cmd)
    options: dict[str, Any] = {
        "build_args": parse_pairs(args.build_arg, "--build-arg"),
        "ready_timeout": args.ready_timeout,
        **connect_kwargs(args),
    }
    if network := network_choice(args):
        options["network"] = {"mode": network[0], "allow": network[1]}
    _sandbox_defaults(template, args)
    info = Template.build_in_background(template, args.name, **options)
    if args.no_follow:
        show_template(args.output, info)
        return 0
    err(f"building template {info.name} (job {info.build_job_id})")
    # With -o json, stdout holds only the template's JSON: the progress goes to stderr.
    progress = Progress(sys.stderr if args.output == "json" else None)
    with interruptible():
        try:
            for entry in Template.logs(args.name, follow=True, **connect_kwargs(args)):
                progress(entry)
        finally:
            progress.close()
        info = Template.get(args.name, **connect_kwargs(args))
    if args.output == "json":
        show(args.output, [info], (), single=True)
    if info.state != "ready":
        err(f"template {info.name} {info.state}: {info.error or 'see its logs'}".rstrip())
    else:
        err(f"template {info.name} ready: {info.size_bytes} bytes")
    return EXIT_FOR_STATE.get(info.state, EXIT_ERROR)


def _sandbox_defaults(template: Any, args: argparse.Namespace) -> None:
    """The template's defaults for its sandboxes, from the --sandbox-* options."""
    limits = {
        name: getattr(args, "sandbox_" + name)
        for name in ("memory_mib", "cpu", "disk_mib", "pids")
        if getattr(args, "sandbox_" + name) is not None
    }
    if limits:
        template.set_limits(**limits)
    if args.sandbox_network is not None or args.sandbox_allow:
        from corral.network.policy import NetworkPolicy

        try:
            policy = NetworkPolicy.parse(args.sandbox_network or "allowlist", args.sandbox_allow)
        except InvalidRequest as exc:
            raise InvalidRequest(f"--sandbox-network/--sandbox-allow: {exc}") from None
        template.set_network({"mode": policy.mode, "allow": list(policy.entries)})


def list_(args: argparse.Namespace) -> None:
    """Your team's templates."""
    from corral.client import Template

    show(args.output, Template.list(**connect_kwargs(args)), COLUMNS)


def get(args: argparse.Namespace) -> None:
    """One template: its state, source, size, metadata, and why it failed."""
    from corral.client import Template

    show_template(args.output, Template.get(args.name, **connect_kwargs(args)))


def logs(args: argparse.Namespace) -> int:
    """A build's output and progress (JSON lines with -o json); with --follow until the
    build ends, exiting with how it ended."""
    from corral.client import Template

    progress = Progress()
    with interruptible():
        entries = Template.logs(
            args.name,
            offset=args.offset,
            event_offset=args.event_offset,
            follow=args.follow,
            **connect_kwargs(args),
        )
        try:
            for entry in entries:
                if args.output == "json":
                    sys.stdout.write(json.dumps(plain(entry), default=_bytes) + "\n")
                    sys.stdout.flush()
                else:
                    progress(entry)
        finally:
            progress.close()
        if not args.follow:
            return 0
        info = Template.get(args.name, **connect_kwargs(args))
    return EXIT_FOR_STATE.get(info.state, EXIT_ERROR)


def _bytes(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    raise TypeError(type(value).__name__)


def rm(args: argparse.Namespace) -> None:
    """Remove a template (refused while a sandbox uses it)."""
    from corral.client import Template

    Template.delete(args.name, **connect_kwargs(args))


def cancel(args: argparse.Namespace) -> None:
    """Stop a template's build; the template is left cancelled."""
    from corral.client import Template

    show_template(args.output, Template.cancel(args.name, **connect_kwargs(args)))


def add_commands(commands: Commands) -> None:
    sub = group(commands, "template", "Build templates (root filesystems) and manage them.")

    def with_name(name: str, handler: Any) -> Any:
        p = command(sub, name, handler)
        p.add_argument("name", metavar="NAME", help="the template's name")
        return p

    p = with_name("build", build)
    # `-f DOCKERFILE [CONTEXT]`: the context is the option's second word (argparse matches
    # an optional positional at once with NAME, so it could not follow the options).
    p.add_argument(
        "-f",
        "--file",
        nargs="+",
        metavar=("DOCKERFILE", "CONTEXT"),
        help="a Dockerfile (- reads stdin) and the directory COPY reads (default: .)",
    )
    p.add_argument(
        "--recipe",
        nargs="+",
        metavar=("FILE", "CONTEXT"),
        help="a YAML recipe (- reads stdin) and the directory its copy steps read",
    )
    p.add_argument("--image", metavar="REF", help="an OCI image: registry/name:tag")
    p.add_argument("--username", help="--image: the registry's user")
    env_option(
        p, "--password", env="CORRAL_REGISTRY_PASSWORD", help="--image: the registry's password"
    )
    p.add_argument("--debian", metavar="SUITE", help="a Debian base: bookworm, …")
    p.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="P",
        help="--debian: a package to install; repeatable",
    )
    p.add_argument("--variant", default="apt", help="--debian: mmdebstrap's variant")
    add_pairs(p, "--build-arg", help="a Dockerfile ARG value; repeatable")
    p.add_argument(
        "--network",
        help="what RUN steps may reach: none (the default), internet or allowlist",
    )
    add_allow(p)
    # The template's defaults for its sandboxes and jobs (what a create leaves unset).
    p.add_argument(
        "--sandbox-memory-mib", type=whole(1), help="its sandboxes' default memory limit"
    )
    p.add_argument(
        "--sandbox-cpu", type=number(float, minimum=0.01), help="its sandboxes' default CPU cores"
    )
    p.add_argument("--sandbox-disk-mib", type=whole(1), help="its sandboxes' default disk")
    p.add_argument("--sandbox-pids", type=whole(1), help="its sandboxes' default process cap")
    p.add_argument(
        "--sandbox-network",
        help="what its sandboxes reach when they name no network: none, internet, allowlist",
    )
    p.add_argument(
        "--sandbox-allow",
        action="append",
        default=[],
        metavar="ENTRY",
        help="an allowlist entry of --sandbox-network; repeatable",
    )
    p.add_argument("--ready-cmd", metavar="CMD", help="must succeed before the template is ready")
    p.add_argument(
        "--ready-timeout", type=whole(1), default=60, help="seconds the ready check may take"
    )
    p.add_argument("--no-follow", action="store_true", help="start the build and return")
    add_output(p)

    add_output(command(sub, "list", list_))
    add_output(with_name("get", get))

    p = with_name("logs", logs)
    p.add_argument("-f", "--follow", action="store_true", help="until the build ends")
    p.add_argument("--offset", type=whole(0), default=0, help="the first log chunk")
    p.add_argument("--event-offset", type=whole(0), default=0, help="the first event")
    add_output(p)

    with_name("rm", rm)
    add_output(with_name("cancel", cancel))
