"""YAML recipes and E2B's Template builder → `BuildPlan`.

A recipe is wrenn's list of shell commands, grown into a template (each step a one-key
mapping, or a bare string for a shell command):

    from: debian:bookworm          # an image; or `template: NAME` for a Corral template,
                                   # or `debian: {suite: bookworm, variant: apt,
                                   # packages: [python3]}` for a Debian base (mmdebstrap)
    steps:
      - apt-get update             # a shell command, as in wrenn's recipes
      - run: pip install flask     # the same; a list is an exec-form argv
      - copy: {src: app/, dest: /app/, chown: app, chmod: "755"}
      - env: {FLASK_ENV: production}
      - workdir: /app
      - user: app
    start: python3 app.py          # a shell command or an argv list
    ready: curl -fs localhost:8000 # wrenn calls it `healthcheck`; either name works
    limits: {memory_mib: 1024, cpu: 2}  # its sandboxes' defaults (what a request leaves 0)
    sandbox_network: internet      # or {mode: allowlist, allow: [pypi.org]}; not RUN's

E2B's builder (`Template().from_image(...).apt_install(...)...`) is read as its SDK sends
it to the build API (`TemplateBase.to_json`): `fromImage`/`fromTemplate`, `steps` of
`{"type": "RUN"|"COPY"|"ENV"|"WORKDIR"|"USER", "args": [...], "force": bool}`,
`startCmd`, `readyCmd`. Its helpers (apt_install, pip_install, npm_install, make_dir, ...)
are already RUN steps there.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import yaml

from corral.errors import InvalidBuild
from corral.images._context import BuildContext, names_directory
from corral.images._steps import Base, BuildPlan, BuildStep
from corral.images._words import NAME

_SHELL = ("/bin/sh", "-c")
_RECIPE_KEYS = {"from", "template", "debian", "steps", "start", "ready", "healthcheck"}
# The template's defaults for its sandboxes, not build steps (BuildPlan.sandbox).
_SANDBOX_KEYS = {"limits", "sandbox_network"}


def parse_recipe(text: str, context: BuildContext | None = None, name: str = "recipe") -> BuildPlan:
    """Compile a YAML recipe; `context` is needed only by `copy` steps."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            doc = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise InvalidBuild(
            f"{name}: not valid YAML ({e}); see the recipe format in the README"
        ) from e
    if not isinstance(doc, dict):
        raise InvalidBuild(f"{name}: a recipe is a mapping with `from:` and `steps:`")
    assert isinstance(node, yaml.MappingNode)
    unknown = sorted(set(map(str, doc)) - _RECIPE_KEYS - _SANDBOX_KEYS)
    if unknown:
        keys = ", ".join(sorted(_RECIPE_KEYS | _SANDBOX_KEYS))
        raise InvalidBuild(f"{name}: unknown key {unknown[0]!r}; a recipe has {keys}")
    lines = {str(k.value): (k.start_mark.line + 1, v) for k, v in node.value}
    if doc.get("ready") is not None and doc.get("healthcheck") is not None:
        raise InvalidBuild(f"{name}: give `ready:` or `healthcheck:` (the same thing), not both")
    base = _recipe_base(doc, name)
    build = _Builder(name, context)
    steps = doc.get("steps") or []
    if not isinstance(steps, list):
        raise InvalidBuild(f"{name} line {lines['steps'][0]}: `steps` is a list")
    step_nodes = lines["steps"][1].value if steps else []
    for item, item_node in zip(steps, step_nodes, strict=True):
        build.recipe_step(item, item_node.start_mark.line + 1)
    for key in ("start", "ready", "healthcheck"):
        if doc.get(key) is not None:
            line = lines[key][0]
            argv = build.argv(doc[key], line, key)
            if key == "start":
                build.steps.append(BuildStep("start", argv, line))
            else:
                build.steps.append(BuildStep("ready", argv, line))
    sandbox = {key: doc[key] for key in _SANDBOX_KEYS if doc.get(key) is not None}
    return BuildPlan(base, tuple(build.steps), sandbox=sandbox)


def parse_e2b_template(
    template: Mapping[str, Any], context: BuildContext | None = None
) -> BuildPlan:
    """Compile an E2B template as its SDK serialises it. With `context` (the SDK's
    `file_context_path`) COPY sources are read from it; without, COPY keeps E2B's
    `filesHash` (the files come in an upload named by it)."""
    name = "E2B template"
    if not isinstance(template, Mapping):
        raise InvalidBuild(f"{name}: a template is a JSON object (TemplateBase.to_json)")
    for key in ("fromImage", "fromTemplate", "startCmd", "readyCmd"):
        if not isinstance(template.get(key) or "", str):
            raise InvalidBuild(f"{name}: {key} is a string")
    registry = template.get("fromImageRegistry") or {}
    if not isinstance(registry, Mapping) or registry.get("type", "registry") != "registry":
        kind = registry.get("type") if isinstance(registry, Mapping) else registry
        raise InvalidBuild(
            f"{name}: fromImageRegistry of type {kind!r} is not supported; "
            "pass username and password (from_image(image, username=, password=))"
        )
    if not isinstance(template.get("steps") or [], list):
        raise InvalidBuild(f"{name}: steps is a list")
    if template.get("fromImage") and template.get("fromTemplate"):
        raise InvalidBuild(f"{name}: give fromImage or fromTemplate, not both")
    if template.get("fromImage"):
        base = Base(
            "image",
            template["fromImage"],
            str(registry.get("username") or ""),
            str(registry.get("password") or ""),
        )
    elif template.get("fromTemplate"):
        base = Base("template", template["fromTemplate"])
    else:
        raise InvalidBuild(f"{name}: no base; start with from_image(...) or from_template(...)")
    build = _Builder(name, context)
    for number, step in enumerate(template.get("steps") or [], start=1):
        build.e2b_step(step, number)
    if template.get("startCmd"):
        build.steps.append(
            BuildStep("start", (*_SHELL, str(template["startCmd"])), len(build.steps) + 1)
        )
    if template.get("readyCmd"):
        build.steps.append(
            BuildStep("ready", (*_SHELL, str(template["readyCmd"])), len(build.steps) + 1)
        )
    return BuildPlan(base, tuple(build.steps))


def _recipe_base(doc: Mapping[str, Any], name: str) -> Base:
    if len([key for key in ("from", "template", "debian") if doc.get(key)]) > 1:
        raise InvalidBuild(
            f"{name}: give one of `from:` (an image), `template:` (a Corral template) or "
            "`debian:` (a Debian base), not both"
        )
    if doc.get("debian"):
        return _debian_base(doc["debian"], name)
    if isinstance(doc.get("from"), str) and doc["from"]:
        return Base("scratch") if doc["from"] == "scratch" else Base("image", doc["from"])
    if isinstance(doc.get("template"), str) and doc["template"]:
        return Base("template", doc["template"])
    raise InvalidBuild(
        f"{name}: no base; add `from: IMAGE`, `template: NAME` or `debian: {{suite: SUITE}}`"
    )


def _debian_base(spec: object, name: str) -> Base:
    """`debian: bookworm`, or `debian: {suite: bookworm, variant: apt, packages: [..]}`
    (the names are checked again by `corral.images.debian` when it bootstraps)."""
    if isinstance(spec, str):
        spec = {"suite": spec}
    if not isinstance(spec, Mapping) or set(spec) - {"suite", "variant", "packages"}:
        raise InvalidBuild(
            f"{name}: `debian:` is a suite name or a mapping of suite, variant and packages"
        )
    suite, variant, packages = spec.get("suite"), spec.get("variant") or "", spec.get("packages")
    if not isinstance(suite, str) or not suite or not isinstance(variant, str):
        raise InvalidBuild(f"{name}: `debian:` needs `suite:` (bookworm); variant is a name")
    if packages is None:
        packages = []
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise InvalidBuild(f"{name}: `debian: packages:` is a list of package names")
    return Base("debian", suite, variant=variant, packages=tuple(packages))


class _Builder:
    """Steps of a recipe or an E2B template, with the working directory so far (relative
    paths are relative to it, as in a Dockerfile)."""

    def __init__(self, name: str, context: BuildContext | None) -> None:
        self.name, self.context = name, context
        self.steps: list[BuildStep] = []
        self.workdir = "/"

    def where(self, line: int) -> str:
        return (
            f"{self.name} line {line}"
            if self.name != "E2B template"
            else f"{self.name} step {line}"
        )

    def fail(self, line: int, message: str) -> InvalidBuild:
        return InvalidBuild(f"{self.where(line)}: {message}")

    def argv(self, value: Any, line: int, what: str) -> tuple[str, ...]:
        if isinstance(value, str) and value.strip():
            return (*_SHELL, value)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise self.fail(
            line, f"{what} is a shell command (a string) or an argv (a list of strings)"
        )

    def recipe_step(self, item: Any, line: int) -> None:
        if isinstance(item, str):
            self.steps.append(BuildStep("run", self.argv(item, line, "a step"), line))
            return
        if not isinstance(item, dict) or len(item) != 1:
            raise self.fail(line, "a step is a shell command or a one-key mapping like `run: CMD`")
        ((kind, value),) = item.items()
        if kind == "run":
            self.steps.append(BuildStep("run", self.argv(value, line, "run"), line))
        elif kind == "copy":
            if (
                not isinstance(value, dict)
                or not {"src", "dest"} <= set(value)
                or set(value) - {"src", "dest", "chown", "chmod"}
            ):
                raise self.fail(
                    line, "copy takes {src: PATH or [PATHS], dest: PATH, chown: USER, chmod: MODE}"
                )
            srcs = value["src"] if isinstance(value["src"], list) else [value["src"]]
            if not srcs:
                raise self.fail(line, "copy src names nothing; give a path or a list of paths")
            self.copy(
                [str(s) for s in srcs],
                str(value["dest"]),
                str(value.get("chown") or ""),
                str(value.get("chmod") or ""),
                line,
            )
        elif kind == "env":
            if not isinstance(value, dict) or not value:
                raise self.fail(line, "env takes a mapping of NAME: VALUE")
            if not all(isinstance(v, str | int | float) or v is None for v in value.values()):
                raise self.fail(line, "env values are strings (quote lists and mappings)")
            self.env([(str(k), "" if v is None else str(v)) for k, v in value.items()], line)
        elif kind in ("workdir", "user"):
            if not isinstance(value, str) or not value.strip():
                raise self.fail(line, f"{kind} takes one string")
            self.workdir_or_user(kind, value, line)
        else:
            raise self.fail(
                line, f"unknown step {kind!r}; a step is run, copy, env, workdir or user"
            )

    def e2b_step(self, step: Any, number: int) -> None:
        if not isinstance(step, Mapping) or not isinstance(step.get("args", []), list):
            raise self.fail(number, "a step is {type, args}")
        kind = str(step.get("type", "")).upper()
        args = [str(a) for a in step.get("args") or []]
        no_cache = bool(step.get("force"))
        if kind == "RUN" and args and args[0].strip():
            options = (("user", args[1]),) if len(args) > 1 and args[1] else ()
            self.steps.append(
                BuildStep("run", (*_SHELL, args[0]), number, options, no_cache=no_cache)
            )
        elif kind == "COPY" and len(args) >= 2:
            user = args[2] if len(args) > 2 else ""
            mode = args[3] if len(args) > 3 else ""
            self.copy(
                [args[0]],
                args[1],
                user,
                mode,
                number,
                files_hash=str(step.get("filesHash") or ""),
                e2b=True,
            )
            if no_cache:
                self.steps[-1] = replace(self.steps[-1], no_cache=True)
        elif kind == "ENV" and args and len(args) % 2 == 0:
            self.env(list(zip(args[::2], args[1::2], strict=True)), number)
        elif kind in ("WORKDIR", "USER") and len(args) == 1 and args[0]:
            self.workdir_or_user(kind.lower(), args[0], number)
        else:
            raise self.fail(
                number,
                f"{kind or 'a step without a type'} with args {args} is not a step Corral "
                "builds (RUN, COPY, ENV, WORKDIR, USER)",
            )

    def env(self, pairs: Sequence[tuple[str, str]], line: int) -> None:
        for key, _ in pairs:
            if not NAME.fullmatch(key):
                raise self.fail(line, f"env name {key!r} is not valid (letters, digits, _)")
        self.steps.append(BuildStep("env", tuple(x for p in pairs for x in p), line))

    def workdir_or_user(self, kind: str, value: str, line: int) -> None:
        if kind == "workdir":
            self.workdir = posixpath.normpath(posixpath.join(self.workdir, value))
            self.steps.append(BuildStep("workdir", (self.workdir,), line))
        else:
            self.steps.append(BuildStep("user", (value,), line))

    def copy(
        self,
        srcs: list[str],
        dest: str,
        chown: str,
        chmod: str,
        line: int,
        files_hash: str = "",
        e2b: bool = False,
    ) -> None:
        options = [("chown", chown)] if chown else []
        mode = None
        if chmod:
            if not chmod.isdigit() or any(c > "7" for c in chmod) or len(chmod) > 4:
                raise self.fail(
                    line, f'chmod {chmod} is not an octal mode like 755 (in YAML, quote it: "0755")'
                )
            mode = int(chmod, 8)
            options.append(("chmod", chmod.zfill(4)))
        target = posixpath.normpath(posixpath.join(self.workdir, dest))
        if self.context is None:
            if not files_hash:
                raise self.fail(
                    line, "copy needs a build context: pass the directory holding its files"
                )
            options.append(("files_hash", files_hash))
            self.steps.append(BuildStep("copy", (*srcs, target), line, tuple(sorted(options))))
            return
        where = self.where(line)
        matches = [m for src in srcs for m in self.context.match(src, where)]
        # E2B's copy("folder/*", "folder") puts each match into the folder.
        into_dir = (
            names_directory(dest) or len(matches) > 1 or (e2b and any(c in srcs[0] for c in "*?["))
        )
        # E2B copies a symlink it is given as a link (its resolveSymlinks defaults to
        # False and is not sent to the build API); a Dockerfile follows it.
        files = self.context.collect(
            matches, target, into_dir=into_dir, chmod=mode, where=where, follow=not e2b
        )
        self.steps.append(BuildStep("copy", (target,), line, tuple(sorted(options)), files))
