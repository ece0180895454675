"""One build plan, whatever it was written in.

A Dockerfile (`_dockerfile`), a YAML recipe and E2B's Template builder (`_recipe`) all
compile to a `BuildPlan`: a base to start from and a list of `BuildStep`s. The builder
runs the steps in order; each step's `cache_key` names the layer it makes, so a rebuild
after editing step 5 finds steps 1-4 in the cache and runs 5 onwards.

What each kind's `args` hold:

    run        argv (shell forms are already `[*shell, text]`); option `user` overrides
               the user in effect for this step only (E2B's `run_cmd(user=)`)
    copy       (dest,); `files` are the context files and where each goes (a file whose
               `dest` is a directory in the image goes inside it, as in Docker); options
               `chown`, `chmod`; with no context (E2B uploads) option `files_hash`
    extract    (dest dir,); `files` is one local archive to unpack there (Dockerfile ADD)
    env        (name, value, name, value, ...): stays in the template
    arg        (name, value): in the environment of later steps, not in the template
    workdir    (absolute path,)
    user       (user[:group],)
    start      argv of the start command ((), when none)
    ready      argv of the ready check ((), to clear one); options interval, timeout,
               start-period, retries (Dockerfile HEALTHCHECK)
    expose     ports ("8080/tcp", ...): recorded, nothing is published
    label      (name, value, ...): recorded
    stopsignal (signal,): recorded
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

StepKind = Literal[
    "run",
    "copy",
    "extract",
    "env",
    "arg",
    "workdir",
    "user",
    "start",
    "ready",
    "expose",
    "label",
    "stopsignal",
]

#: Steps that make a layer; the others change only the template's metadata.
LAYER_KINDS: frozenset[str] = frozenset({"run", "copy", "extract"})


@dataclass(frozen=True)
class ContextFile:
    """One entry of the build context that a COPY or ADD puts into the image."""

    path: str  # relative to the context root, "/"-separated
    dest: str  # absolute path in the image
    kind: Literal["file", "dir", "symlink"]
    mode: int  # permission bits (the context's, or the step's --chmod)
    digest: str  # sha256: of the bytes (a symlink: of its target text; a dir: "")
    target: str = ""  # a symlink's target, copied verbatim, never followed on the host


@dataclass(frozen=True)
class BuildStep:
    """One instruction, normalised; `line` is where it was written (1-based: the line of
    a Dockerfile or recipe, the instruction's number in an E2B template)."""

    kind: StepKind
    args: tuple[str, ...]
    line: int
    options: tuple[tuple[str, str], ...] = ()
    files: tuple[ContextFile, ...] = ()
    no_cache: bool = False  # E2B's skip_cache/force: run it even when the key is cached

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)

    def describe(self) -> str:
        """The step as a build log shows it."""
        text = " ".join(self.args)
        return f"{self.kind.upper()} {text}".rstrip()


@dataclass(frozen=True)
class Base:
    """What the first step starts from: an OCI image reference, a Corral template by
    name, a Debian base (`ref` is its suite, bootstrapped by mmdebstrap with `variant`
    and `packages` from the server's mirror), or nothing (`FROM scratch`)."""

    kind: Literal["image", "template", "scratch", "debian"]
    ref: str = ""
    username: str = ""  # registry credentials for `image` (E2B's from_image(username=))
    password: str = field(default="", repr=False)
    variant: str = ""  # `debian`: mmdebstrap's variant ("": apt)
    packages: tuple[str, ...] = ()  # `debian`: packages to include


@dataclass(frozen=True)
class BuildState:
    """What is in effect when a step runs: the step's environment (ENV and ARG values),
    working directory and user."""

    env: Mapping[str, str]
    workdir: str = "/"
    user: str = "root"


@dataclass(frozen=True)
class TemplateMetadata:
    """What a finished build leaves in the template row besides its layers."""

    env: Mapping[str, str]
    workdir: str
    user: str
    start: tuple[str, ...]
    ready: tuple[str, ...]
    ready_options: Mapping[str, str]
    labels: Mapping[str, str]
    expose: tuple[str, ...]
    stop_signal: str


@dataclass(frozen=True)
class BuildPlan:
    base: Base
    steps: tuple[BuildStep, ...]
    notes: tuple[str, ...] = ()  # what was ignored on purpose, for the build log
    # A recipe's defaults for the template's sandboxes, as written (`limits`,
    # `sandbox_network`); checked by the service (corral.templates.defaults), not a step.
    sandbox: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def states(self) -> Iterator[tuple[BuildStep, BuildState]]:
        """Each step with the state in effect when it runs (before it applies)."""
        env: dict[str, str] = {}
        build_args: dict[str, str] = {}
        workdir, user = "/", "root"
        for step in self.steps:
            # ENV wins over an ARG of the same name, as in Docker.
            yield step, BuildState({**build_args, **env}, workdir, user)
            if step.kind == "env":
                env.update(_pairs(step.args))
            elif step.kind == "arg":
                build_args.update(_pairs(step.args))
            elif step.kind == "workdir":
                workdir = step.args[0]
            elif step.kind == "user":
                user = step.args[0]

    @property
    def metadata(self) -> TemplateMetadata:
        env: dict[str, str] = {}
        labels: dict[str, str] = {}
        workdir, user, stop_signal = "/", "root", ""
        start: tuple[str, ...] = ()
        ready: tuple[str, ...] = ()
        ready_options: dict[str, str] = {}
        expose: list[str] = []
        for step in self.steps:
            if step.kind == "env":
                env.update(_pairs(step.args))
            elif step.kind == "label":
                labels.update(_pairs(step.args))
            elif step.kind == "workdir":
                workdir = step.args[0]
            elif step.kind == "user":
                user = step.args[0]
            elif step.kind == "start":
                start = step.args
            elif step.kind == "ready":
                ready, ready_options = step.args, dict(step.options)
            elif step.kind == "expose":
                expose.extend(p for p in step.args if p not in expose)
            elif step.kind == "stopsignal":
                stop_signal = step.args[0]
        return TemplateMetadata(
            env, workdir, user, start, ready, ready_options, labels, tuple(expose), stop_signal
        )


def cache_key(parent: str, step: BuildStep, state: BuildState) -> str:
    """The name of what `step` makes on top of `parent` (the previous step's key, or the
    base's digest): equal inputs, equal key. A COPY's key holds its files' contents and
    modes, never their mtimes, so touching a file hits the cache and editing it misses.
    `line` is left out: moving a step without changing it keeps its key."""
    doc = {
        "v": 1,
        "parent": parent,
        "kind": step.kind,
        "args": step.args,
        "options": sorted(step.options),
        "files": [(f.path, f.dest, f.kind, f.mode, f.digest, f.target) for f in step.files],
        "env": sorted(state.env.items()),
        "workdir": state.workdir,
        "user": state.user,
    }
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def cache_keys(plan: BuildPlan, base_digest: str) -> list[str]:
    """Every step's key, each chained to the one before, so that a changed step changes
    its own key and all that follow."""
    keys: list[str] = []
    parent = base_digest
    for step, state in plan.states():
        parent = cache_key(parent, step, state)
        keys.append(parent)
    return keys


def _pairs(args: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    return zip(args[::2], args[1::2], strict=True)
