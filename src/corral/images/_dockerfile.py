"""Dockerfile → `BuildPlan`.

Docker's syntax (parser directives, `\\` continuations, comments, exec and shell forms,
`$VAR`/`${VAR:-x}` substitution in the instructions Docker substitutes in), compiled to
Corral's steps. Single-stage only: a second FROM, or COPY --from, is refused, since a
template is one chain of layers; build the earlier stage as a template and start FROM it.
Every refusal names the line and says what to write instead.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from corral.errors import InvalidBuild
from corral.images._context import BuildContext, names_directory
from corral.images._steps import Base, BuildPlan, BuildStep
from corral.images._words import NAME, words

_DIRECTIVE = re.compile(r"#\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*?)\s*$")
_HEREDOC = re.compile(r"(?:^|\s)<<-?\s*[\"']?[A-Za-z_]")
_PORT = re.compile(r"\d{1,5}(-\d{1,5})?(/(tcp|udp|sctp))?", re.IGNORECASE)
_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
_SIGNAL = re.compile(r"(SIG)?[A-Z0-9+-]+|\d+")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://|^git@")


def parse_dockerfile(
    text: str,
    context: BuildContext | None = None,
    build_args: Mapping[str, str] | None = None,
    name: str = "Dockerfile",
) -> BuildPlan:
    """Compile a Dockerfile; `context` is needed only by COPY and ADD, `build_args` are
    `--build-arg` values (each must be declared by an ARG)."""
    parser = _Parser(name, context, dict(build_args or {}))
    for line, instruction in _instructions(text, parser):
        parser.instruction(line, instruction)
    return parser.finish()


@dataclass
class _Parser:
    name: str
    context: BuildContext | None
    build_args: dict[str, str]
    escape: str = "\\"
    notes: list[str] = field(default_factory=list)
    base: Base | None = None
    global_args: dict[str, str] = field(default_factory=dict)
    declared: set[str] = field(default_factory=set)
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    shell: tuple[str, ...] = ("/bin/sh", "-c")
    steps: list[BuildStep] = field(default_factory=list)
    cmd: tuple[tuple[str, ...], bool, int] | None = None  # argv, exec form?, line
    entrypoint: tuple[tuple[str, ...], bool, int] | None = None

    def fail(self, line: int, message: str) -> InvalidBuild:
        return InvalidBuild(f"{self.name} line {line}: {message}")

    # -- the instructions ------------------------------------------------------------------

    def instruction(self, line: int, text: str) -> None:
        word, *more = text.split(None, 1)
        rest = more[0].strip() if more else ""
        op = word.upper()
        if self.base is None and op not in ("FROM", "ARG"):
            raise self.fail(
                line,
                f"{op} before FROM; a Dockerfile starts with FROM (only ARG may come before it)",
            )
        handler = _HANDLERS.get(op)
        if handler is None:
            if op in _REFUSED:
                raise self.fail(line, _REFUSED[op])
            raise self.fail(line, f"unknown instruction {word}")
        if not rest:
            raise self.fail(line, f"{op} needs arguments")
        handler(self, line, rest)

    def from_(self, line: int, rest: str) -> None:
        if self.base is not None:
            raise self.fail(
                line,
                "a second FROM starts another build stage; Corral builds single-stage "
                "Dockerfiles: build the earlier stage as its own template and start this "
                "one FROM it",
            )
        words = self.words(line, rest, {**self.global_args})
        if words and words[0].startswith("--"):
            raise self.fail(
                line,
                f"FROM {words[0]} is not supported: Corral builds for this host's "
                "platform; drop the flag",
            )
        if len(words) == 3 and words[1].lower() == "as":
            words = words[:1]  # naming the only stage is harmless
        if len(words) != 1:
            raise self.fail(line, "FROM takes one image (`FROM IMAGE [AS NAME]`)")
        ref = words[0]
        self.base = Base("scratch") if ref == "scratch" else Base("image", ref)

    def arg(self, line: int, rest: str) -> None:
        scope = self.args if self.base is not None else self.global_args
        for word in self.words(line, rest, {**scope, **self.env}):
            name, has_default, default = word.partition("=")
            if not NAME.fullmatch(name):
                raise self.fail(line, f"ARG {name!r} is not a valid name (letters, digits, _)")
            self.declared.add(name)
            if name in self.build_args:
                value: str | None = self.build_args[name]
            elif has_default:
                value = default
            elif self.base is not None and name in self.global_args:
                value = self.global_args[name]  # `ARG NAME` re-declares a global one
            else:
                value = None  # declared, unset
            if value is not None:
                scope[name] = value
                if self.base is not None:
                    self.steps.append(BuildStep("arg", (name, value), line))

    def env_(self, line: int, rest: str) -> None:
        pairs = self.pairs(line, "ENV", rest)
        self.env.update(pairs)
        self.steps.append(BuildStep("env", _flat(pairs), line))

    def label(self, line: int, rest: str) -> None:
        self.steps.append(BuildStep("label", _flat(self.pairs(line, "LABEL", rest)), line))

    def maintainer(self, line: int, rest: str) -> None:
        self.steps.append(BuildStep("label", ("maintainer", rest), line))

    def workdir_(self, line: int, rest: str) -> None:
        path = self.word(line, rest)
        self.workdir = posixpath.normpath(posixpath.join(self.workdir, path))
        self.steps.append(BuildStep("workdir", (self.workdir,), line))

    def user(self, line: int, rest: str) -> None:
        user = self.word(line, rest)
        if not user or any(c.isspace() for c in user):
            raise self.fail(line, "USER takes one name or id (`USER NAME[:GROUP]`)")
        self.steps.append(BuildStep("user", (user,), line))

    def run(self, line: int, rest: str) -> None:
        if rest.startswith("--"):
            flag = rest.split()[0]
            raise self.fail(
                line,
                f"RUN {flag} is not supported: a RUN step runs in a sandbox of the template "
                "so far, with the build's network policy; drop the flag",
            )
        if _HEREDOC.search(rest):
            raise self.fail(
                line,
                "heredocs (<<EOF) are not supported: put the script in the build context and "
                "COPY it, or write the commands on one RUN joined with &&",
            )
        self.steps.append(BuildStep("run", self.command(line, "RUN", rest)[0], line))

    def cmd_(self, line: int, rest: str) -> None:
        argv, exec_form = self.command(line, "CMD", rest)
        self.cmd = (argv, exec_form, line)

    def entrypoint_(self, line: int, rest: str) -> None:
        argv, exec_form = self.command(line, "ENTRYPOINT", rest)
        self.entrypoint = (argv, exec_form, line)

    def healthcheck(self, line: int, rest: str) -> None:
        if rest.upper() == "NONE":
            self.steps.append(BuildStep("ready", (), line))
            return
        options: list[tuple[str, str]] = []
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            rest = rest.strip()
            key, _, value = flag[2:].partition("=")
            durations = ("interval", "timeout", "start-period", "start-interval")
            if (key == "retries" and value.isdigit()) or (
                key in durations and _DURATION.fullmatch(value)
            ):
                options.append((key, value))
            else:
                raise self.fail(
                    line,
                    f"HEALTHCHECK {flag} is not understood: use --interval=30s, --timeout=5s, "
                    "--start-period=10s, --start-interval=1s or --retries=3",
                )
        word, _, command = rest.partition(" ")
        if word.upper() != "CMD" or not command.strip():
            raise self.fail(line, "HEALTHCHECK takes `[OPTIONS] CMD command` or NONE")
        argv = self.command(line, "HEALTHCHECK", command.strip())[0]
        self.steps.append(BuildStep("ready", argv, line, tuple(options)))

    def shell_(self, line: int, rest: str) -> None:
        argv = _exec_form(rest)
        if not argv:
            raise self.fail(line, 'SHELL takes a JSON array, e.g. SHELL ["/bin/bash", "-c"]')
        self.shell = argv

    def expose(self, line: int, rest: str) -> None:
        ports = self.words(line, rest, self.scope())
        bad = [p for p in ports if not _PORT.fullmatch(p)]
        if bad or not ports:
            raise self.fail(line, f"EXPOSE takes ports like 8080 or 53/udp, not {' '.join(bad)!r}")
        self.steps.append(BuildStep("expose", tuple(p.lower() for p in ports), line))

    def stopsignal(self, line: int, rest: str) -> None:
        signal = self.word(line, rest)
        if not _SIGNAL.fullmatch(signal):
            raise self.fail(line, f"STOPSIGNAL takes a signal name or number, not {signal!r}")
        self.steps.append(BuildStep("stopsignal", (signal,), line))

    def copy(self, line: int, rest: str) -> None:
        self.copy_or_add(line, "COPY", rest)

    def add(self, line: int, rest: str) -> None:
        self.copy_or_add(line, "ADD", rest)

    def copy_or_add(self, line: int, op: str, rest: str) -> None:
        if _HEREDOC.search(rest):
            raise self.fail(
                line,
                f"heredocs (<<EOF) in {op} are not supported: put the file in the build context",
            )
        words = _exec_form(rest) or tuple(self.words(line, rest, self.scope()))
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            key, _, value = words[0][2:].partition("=")
            words = words[1:]
            if key == "from":
                raise self.fail(
                    line,
                    f"{op} --from copies out of another stage or image; Corral builds "
                    "single-stage Dockerfiles: build that stage as a template and start FROM it",
                )
            if key == "link":
                continue  # every COPY is its own layer here already
            if key not in ("chown", "chmod"):
                raise self.fail(line, f"{op} --{key} is not supported; use --chown or --chmod")
            flags[key] = value
        if len(words) < 2:
            raise self.fail(line, f"{op} takes sources and a destination (`{op} SRC... DEST`)")
        *sources, dest = words
        chmod = self.chmod(line, op, flags.get("chmod"))
        options = tuple(sorted(flags.items()))
        if op == "ADD":
            for src in sources:
                if _URL.search(src):
                    raise self.fail(
                        line,
                        f"ADD of a URL ({src}) is refused: a build reaches the network only "
                        "from RUN steps, under the build's network policy; write "
                        "`RUN curl -fsSLo DEST URL` and allow that host in the policy",
                    )
        if self.context is None:
            raise self.fail(
                line, f"{op} needs a build context: pass the directory holding its files"
            )
        where = f"{self.name} line {line}"
        matches = [m for src in sources for m in self.context.match(src, where)]
        many = len(matches) > 1 or len(sources) > 1 or any(re.search(r"[*?\[]", s) for s in sources)
        into_dir = names_directory(dest)
        if many and not into_dir:
            raise self.fail(
                line,
                f"{op} of several files needs a directory destination ending in /, like {dest}/",
            )
        target = posixpath.normpath(posixpath.join(self.workdir, dest))
        plain: list[str] = []
        for rel in matches:
            if op == "ADD" and self.context.is_archive(rel, where):
                archive = self.context.collect(
                    [rel], target, into_dir=False, chmod=None, where=where
                )
                self.steps.append(BuildStep("extract", (target,), line, options, archive))
            else:
                plain.append(rel)
        if plain:
            files = self.context.collect(plain, target, into_dir=into_dir, chmod=chmod, where=where)
            self.steps.append(BuildStep("copy", (target,), line, options, files))

    # -- helpers ---------------------------------------------------------------------------

    def scope(self) -> dict[str, str]:
        return {**self.args, **self.env}

    def words(self, line: int, text: str, env: Mapping[str, str]) -> list[str]:
        return words(text, env, self.escape, lambda m: self.fail(line, m), split=True)

    def word(self, line: int, text: str) -> str:
        return "".join(
            words(text, self.scope(), self.escape, lambda m: self.fail(line, m), split=False)
        )

    def pairs(self, line: int, op: str, rest: str) -> list[tuple[str, str]]:
        first = rest.split(None, 1)[0]
        if "=" not in first:  # the old `ENV NAME value with spaces` form
            name, _, value = rest.partition(" ")
            words = [f"{name}={self.word(line, value.strip())}"]
            if not value.strip():
                raise self.fail(line, f"{op} {name} needs a value (`{op} NAME=VALUE`)")
        else:
            words = self.words(line, rest, self.scope())
        pairs = []
        for word in words:
            name, eq, value = word.partition("=")
            if not eq or not name:
                raise self.fail(line, f"{op} takes NAME=VALUE pairs; {word!r} has no name or no =")
            if op == "ENV" and not NAME.fullmatch(name):
                raise self.fail(
                    line, f"ENV {name!r} is not a valid variable name (letters, digits, _)"
                )
            pairs.append((name, value))
        return pairs

    def command(self, line: int, op: str, rest: str) -> tuple[tuple[str, ...], bool]:
        argv = _exec_form(rest)
        if argv is not None:
            if not argv:
                raise self.fail(line, f"{op} [] runs nothing; give a command")
            return argv, True
        if rest.startswith("["):
            raise self.fail(
                line,
                f"{op} {rest} looks like exec form but is not a JSON array of strings: "
                'use double quotes, as in ["python3", "app.py"], or drop the brackets',
            )
        return (*self.shell, rest), False

    def chmod(self, line: int, op: str, value: str | None) -> int | None:
        if value is None:
            return None
        if not re.fullmatch(r"[0-7]{3,4}", value):
            raise self.fail(line, f"{op} --chmod={value} is not an octal mode like 755 or 0644")
        return int(value, 8)

    def finish(self) -> BuildPlan:
        if self.base is None:
            raise InvalidBuild(f"{self.name}: no FROM; a Dockerfile starts with FROM IMAGE")
        unused = sorted(set(self.build_args) - self.declared)
        if unused:
            raise InvalidBuild(
                f"{self.name}: build argument {', '.join(unused)} is not declared by any ARG; "
                f"add `ARG {unused[0]}` to the Dockerfile or drop the argument"
            )
        start = self.start_command()
        steps = self.steps
        if start is not None:
            steps = [*steps, start]
        return BuildPlan(self.base, tuple(steps), tuple(self.notes))

    def start_command(self) -> BuildStep | None:
        """ENTRYPOINT and CMD as Docker combines them: an exec-form ENTRYPOINT takes CMD
        as its arguments; a shell-form one ignores CMD."""
        if self.entrypoint is None and self.cmd is None:
            return None
        if self.entrypoint is None:
            assert self.cmd is not None
            return BuildStep("start", self.cmd[0], self.cmd[2])
        argv, exec_form, line = self.entrypoint
        if exec_form and self.cmd is not None:
            return BuildStep("start", (*argv, *self.cmd[0]), max(line, self.cmd[2]))
        return BuildStep("start", argv, line)


_Handler = Callable[[_Parser, int, str], None]
_HANDLERS: dict[str, _Handler] = {
    "FROM": _Parser.from_,
    "ARG": _Parser.arg,
    "ENV": _Parser.env_,
    "LABEL": _Parser.label,
    "MAINTAINER": _Parser.maintainer,
    "WORKDIR": _Parser.workdir_,
    "USER": _Parser.user,
    "RUN": _Parser.run,
    "CMD": _Parser.cmd_,
    "ENTRYPOINT": _Parser.entrypoint_,
    "HEALTHCHECK": _Parser.healthcheck,
    "SHELL": _Parser.shell_,
    "EXPOSE": _Parser.expose,
    "STOPSIGNAL": _Parser.stopsignal,
    "COPY": _Parser.copy,
    "ADD": _Parser.add,
}
_REFUSED = {
    "VOLUME": "VOLUME is not supported: Corral volumes are named and chosen when a sandbox "
    "starts (`corral volume create`, then `volumes=` on the sandbox); remove the line",
    "ONBUILD": "ONBUILD is not supported: it defers instructions to images built FROM this "
    "one; write them in the Dockerfile that needs them",
}


def _instructions(text: str, parser: _Parser) -> list[tuple[int, str]]:
    """The logical lines (continuations joined, comments dropped), each with the number of
    its first line; parser directives at the top set `parser.escape` or become notes."""
    lines = text.splitlines()
    n = 0
    seen: set[str] = set()
    while n < len(lines):
        m = _DIRECTIVE.fullmatch(lines[n].strip())
        if m is None or m.group(1).lower() not in ("syntax", "escape", "check"):
            break
        key, value = m.group(1).lower(), m.group(2)
        if key in seen:
            raise parser.fail(n + 1, f"the parser directive {key} is given twice")
        seen.add(key)
        if key == "escape":
            if value not in ("\\", "`"):
                raise parser.fail(n + 1, f"escape={value} is not \\ or `")
            parser.escape = value
        else:
            parser.notes.append(
                f"{parser.name} line {n + 1}: `# {key}={value}` ignored: "
                "Corral reads the Dockerfile itself"
            )
        n += 1
    out: list[tuple[int, str]] = []
    current: str | None = None
    start = 0
    for number in range(n, len(lines)):
        stripped = lines[number].strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation, as in Docker
        if current is None:
            start, current = number + 1, ""
        body = lines[number].rstrip() if current else stripped
        if body.endswith(parser.escape):
            current += body[:-1]
            continue
        out.append((start, (current + body).strip()))
        current = None
    if current is not None and current.strip():
        out.append((start, current.strip()))
    return out


def _exec_form(text: str) -> tuple[str, ...] | None:
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(value)


def _flat(pairs: list[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(x for pair in pairs for x in pair)
