"""One template build: a base, then the plan's steps, each layer step cached by its key.

    base      `image` (oci.pull; a name of one of the team's templates is that template,
              as Docker prefers a local image), `template` (the team's ready template), `debian`
              (mmdebstrap from CORRAL_DEBIAN_MIRROR, cached like a step) or `scratch`
    run       a sandbox of the layers so far (namespace tier, the build's network policy,
              the step's environment and working directory); its snapshot's new layer
              (`Sandbox.snapshot`: the upper dir, whiteouts kept) is the step's layer
    copy      the context files the plan names, checked against their digests, as a layer
    extract   a context archive unpacked (with the layer store's checks) under its dest
    others    change only the template's metadata

A layer step whose cache key (`corral.images.cache_key`, chained from the base) is in the
build cache reuses its layer; editing step 5 changes the keys from 5 on, so 1-4 hit. The
ready check (the plan's, with its start command running) must pass in a sandbox of the
result within the request's ready timeout.

RUN runs as the USER in effect (root unless the plan says otherwise, as in Docker): root
of the sandbox's own id range, confined to it (`corral.isolation.idrange`); what it writes
is stored with the ids it has inside. The template's sandboxes run as its last USER.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from corral.errors import BuildFailed, CorralError, UnknownLayer
from corral.images import BuildPlan, BuildState, BuildStep, ContextFile, cache_key, oci
from corral.images._archive import unpack
from corral.images.debian import bootstrap_layer
from corral.isolation import Sandbox
from corral.network.policy import NetworkPolicy
from corral.store.templates import TemplateRow
from corral.templates._plan import plan_from_dict
from corral.templates.catalog import TemplateCatalog, account, command_text

STDOUT, STDERR = 1, 2
TAIL_BYTES = 2048  # of a failing step's output, in the template's error
_MAX_LINKS = 40


class BuildReport(Protocol):
    """Where a build's output and progress go (the build job's logs and events)."""

    def log(self, step: int, stream: int, data: bytes) -> None: ...

    def event(self, kind: str, reason: str, **data: object) -> None: ...


@dataclass(frozen=True)
class BuildResult:
    layers: list[str]
    env: dict[str, str]
    workdir: str | None
    user: str
    start_cmd: str | None
    ready_cmd: str | None
    size_bytes: int
    steps_cached: int


@dataclass
class _Base:
    layers: list[str]
    env: dict[str, str]
    workdir: str | None
    key: str  # what the first step's cache key chains from


def _digest(doc: object) -> str:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class Builder:
    """Builds the template row `row` (state `building`) from the plan in its request."""

    def __init__(self, catalog: TemplateCatalog, row: TemplateRow, report: BuildReport) -> None:
        self.catalog = catalog
        self.store = catalog.store
        self.layers = catalog.layers
        self.engine = catalog.engine
        self.settings = catalog.settings
        self.row = row
        self.report = report
        request = row.request
        self.plan: BuildPlan = plan_from_dict(request["plan"])
        self.network = NetworkPolicy.parse(request["network"]["mode"], request["network"]["allow"])
        self.ready_timeout = float(request["ready_timeout_s"])
        self.has_context = bool(request.get("context"))
        self.total = len(self.plan.steps)
        # Layers this build uses are referenced for its duration: a collector running
        # meanwhile keeps them.
        self.holder = f"build.{row.id}"
        self.held: set[str] = set()
        self.scratch = f"{row.id}-build"  # the engine template of its sandboxes
        self.context_root: Path | None = None

    # -- the build ------------------------------------------------------------------------

    async def run(self) -> BuildResult:
        try:
            return await self._run()
        finally:
            if self.scratch in self.engine.templates.names():
                self.engine.templates.remove(self.scratch)
            for digest in self.held:
                self.layers.release(digest, self.holder)

    async def _run(self) -> BuildResult:
        base = await self._base()
        layers = list(base.layers)
        parent = base.key
        cached = 0
        for index, (step, state) in enumerate(self.plan.states()):
            label = self._label(index, step)
            self.report.event(
                "step_start", label, step=index, name=step.describe(), total=self.total
            )
            started = time.monotonic()
            parent = cache_key(parent, step, state)
            from_cache = False
            if step.kind in ("run", "copy", "extract"):
                digest = None if step.no_cache else self._cached(parent)
                if digest is not None:
                    from_cache = True
                    cached += 1
                    self.report.event("cached", f"{label}: cached", step=index, layer=digest)
                else:
                    digest = await self._make(index, step, state, layers, base.env)
                    self.store.cache_layer(parent, digest)
                self._hold(digest)
                layers.append(digest)
            self.report.event(
                "step_end",
                f"{label}: done",
                step=index,
                name=step.describe(),
                cached=from_cache,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
        meta = self.plan.metadata
        env = {**base.env, **meta.env}
        workdir = meta.workdir if any(s.kind == "workdir" for s in self.plan.steps) else None
        workdir = workdir or base.workdir
        if not layers:
            raise BuildFailed(
                "the build made no layer: a template needs a file system (start from an "
                "image, a template or a Debian base, or COPY files in)"
            )
        if meta.ready:
            await self._ready_check(layers, env, workdir, meta.user, meta.start, meta.ready)
        return BuildResult(
            layers=layers,
            env=env,
            workdir=workdir,
            user=meta.user,
            start_cmd=command_text(meta.start),
            ready_cmd=command_text(meta.ready),
            size_bytes=sum(self.layers.get(d).size_bytes for d in dict.fromkeys(layers)),
            steps_cached=cached,
        )

    def _label(self, index: int, step: BuildStep) -> str:
        return f"step {index + 1}/{self.total} {step.describe()}"

    def _hold(self, digest: str) -> None:
        if digest not in self.held:
            self.layers.reference(digest, self.holder)
            self.held.add(digest)

    def _cached(self, key: str) -> str | None:
        digest = self.store.cached_layer(key)
        if digest is None:
            return None
        try:
            self.layers.get(digest)
        except UnknownLayer:  # collected since: make it again
            self.store.forget_cached([digest])
            return None
        return digest

    # -- the base -----------------------------------------------------------------------

    async def _base(self) -> _Base:
        base = self.plan.base
        if base.kind == "scratch":
            return _Base([], {}, None, "scratch")
        row = self.catalog.base_template(self.row.team_id, base)
        if row is not None:
            for digest in row.layers:
                self._hold(digest)
            doc = {"template": row.layers, "env": row.env, "workdir": row.workdir}
            return _Base(list(row.layers), dict(row.env), row.workdir, _digest(doc))
        if base.kind == "image":
            self.report.event("pull", f"pulling {base.ref}")
            auth = (base.username, base.password) if base.username else None
            try:
                image = await asyncio.to_thread(
                    oci.pull,
                    base.ref,
                    self.layers,
                    auth=auth,
                    max_bytes=self.settings.template_max_bytes,
                )
            except CorralError as exc:
                raise BuildFailed(f"pulling the base image {base.ref} failed: {exc}") from None
            for digest in image.layers:
                self._hold(digest)
            self.report.event("pulled", f"pulled {image.size_bytes} bytes", bytes=image.size_bytes)
            env = dict(item.split("=", 1) for item in image.config.env if "=" in item)
            workdir = image.config.working_dir or None
            doc = {"image": list(image.layers), "env": env, "workdir": workdir}
            return _Base(list(image.layers), env, workdir, _digest(doc))
        return await self._debian()

    async def _debian(self) -> _Base:
        base = self.plan.base
        variant = base.variant or "apt"
        mirror = self.settings.debian_mirror
        key = _digest(
            {
                "debian": base.ref,
                "variant": variant,
                "packages": sorted(base.packages),
                "mirror": mirror,
            }
        )
        digest = self._cached(key)
        if digest is not None:
            self.report.event("cached", f"Debian {base.ref}: cached", layer=digest)
        else:
            self.report.event("bootstrap", f"bootstrapping Debian {base.ref} ({variant})")
            try:
                layer = await asyncio.to_thread(
                    bootstrap_layer,
                    self.layers,
                    base.ref,
                    mirror=mirror,
                    variant=variant,
                    include=base.packages,
                    max_bytes=self.settings.template_max_bytes,
                )
            except CorralError as exc:
                raise BuildFailed(f"the Debian base {base.ref} failed: {exc}") from None
            digest = layer.digest
            self.store.cache_layer(key, digest)
        self._hold(digest)
        return _Base([digest], {}, None, key)

    # -- layer steps --------------------------------------------------------------------

    async def _make(
        self,
        index: int,
        step: BuildStep,
        state: BuildState,
        layers: list[str],
        base_env: Mapping[str, str],
    ) -> str:
        if step.kind == "run":
            return await self._run_step(index, step, state, layers, base_env)
        with self.layers.staging() as staging:
            tree = staging / "tree"
            tree.mkdir(mode=0o755)
            if step.kind == "copy":
                await asyncio.to_thread(self._copy_files, index, step, tree)
            else:
                await asyncio.to_thread(self._extract, index, step, tree)
            layer = await asyncio.to_thread(
                self.layers.import_dir, tree, max_bytes=self.settings.template_max_bytes
            )
        return layer.digest

    async def _run_step(
        self,
        index: int,
        step: BuildStep,
        state: BuildState,
        layers: list[str],
        base_env: Mapping[str, str],
    ) -> str:
        label = self._label(index, step)
        if not layers:
            raise BuildFailed(
                f"{label}: RUN needs a file system with the program it runs; FROM scratch "
                "has none (COPY one in first, or start from an image, a template or Debian)"
            )
        env = {**base_env, **state.env}
        box = await self._sandbox(layers, env, state.user)
        try:
            if state.workdir != "/":
                await box.make_dir(state.workdir)
            tail = await self._exec(box, index, list(step.args), env, state.workdir, label)
            if tail is not None:
                raise BuildFailed(tail)
            # Its upper dir as one more layer (frozen while read; whiteouts kept).
            made = await box.snapshot(self.layers, max_bytes=self.settings.template_max_bytes)
        finally:
            await box.destroy()
        return made[-1]

    async def _sandbox(self, layers: list[str], env: Mapping[str, str], user: str) -> Sandbox:
        """A sandbox of `layers` whose commands and file calls run as `user` (USER)."""
        self.engine.templates.add(self.scratch, self.layers, layers, env=env, user=account(user))
        return await self.engine.create(
            template=self.scratch, network=self.network, isolation="namespace"
        )

    async def _exec(
        self,
        box: Sandbox,
        index: int,
        argv: list[str],
        env: Mapping[str, str],
        cwd: str,
        label: str,
        timeout: float | None = None,
    ) -> str | None:
        """Run `argv`, its output into the step's log; None when it exits 0, else the
        error: what failed and the tail of its output."""
        command = await box.exec(argv, env=dict(env), cwd=cwd, timeout=timeout)
        tail = b""
        async for chunk in command:
            self.report.log(index, STDOUT if chunk.stream == "stdout" else STDERR, chunk.data)
            tail = (tail + chunk.data)[-TAIL_BYTES:]
        result = await command.wait()
        if result.reason == "exited" and result.exit_code == 0:
            return None
        how = (
            f"exited with code {result.exit_code}"
            if result.reason == "exited"
            else f"{result.reason} ({result.error or 'no detail'})"
        )
        text = tail.decode(errors="replace").rstrip()
        return f"{label} {how}" + (f":\n{text}" if text else " (no output)")

    # -- the build context --------------------------------------------------------------

    def _context(self, label: str) -> Path:
        """The context's files: its tar imported as a layer (checked like any archive)."""
        if self.context_root is None:
            path = self.catalog.context_path(self.row.id)
            if not self.has_context or not path.is_file():
                raise BuildFailed(f"{label}: the build has no context; send the files with it")
            with open(path, "rb") as stream:
                layer = self.layers.import_tar(stream, max_bytes=self.settings.template_max_bytes)
            self._hold(layer.digest)
            self.context_root = layer.path
        return self.context_root

    def _copy_files(self, index: int, step: BuildStep, tree: Path) -> None:
        label = self._label(index, step)
        root = self._context(label)
        uid, gid = _chown(step.option("chown"), label)
        for f in step.files:
            target = _place(tree, f.dest, label)
            if f.kind == "dir":
                target.mkdir(exist_ok=True)
                os.chmod(target, f.mode)
            elif f.kind == "symlink":
                target.unlink(missing_ok=True)
                os.symlink(f.target, target)
            else:
                _copy_checked(_resolve(root, f.path, label), target, f, label)
            if uid is not None:
                os.lchown(target, uid, gid if gid is not None else uid)

    def _extract(self, index: int, step: BuildStep, tree: Path) -> None:
        label = self._label(index, step)
        root = self._context(label)
        (archive,) = step.files
        source = _resolve(root, archive.path, label)
        _check_digest(source, archive, label)
        target = _place(tree, step.args[0], label)
        target.mkdir(exist_ok=True)
        with open(source, "rb") as stream:
            unpack(stream, target, self.settings.template_max_bytes)

    # -- the ready check ----------------------------------------------------------------

    async def _ready_check(
        self,
        layers: list[str],
        env: Mapping[str, str],
        workdir: str | None,
        user: str,
        start: tuple[str, ...],
        ready: tuple[str, ...],
    ) -> None:
        """`ready` must exit 0 within the ready timeout, in a sandbox of the result with
        `start` running; tried again every half second until then."""
        index = self.total  # its log is the step after the last
        label = f"ready check {command_text(ready)}"
        self.report.event("step_start", label, step=index, name="ready check", total=self.total)
        deadline = time.monotonic() + self.ready_timeout
        box = await self._sandbox(layers, env, user)
        try:
            cwd = workdir or "/workspace"
            if start:
                await box.exec(list(start), env=dict(env), cwd=cwd, background=True)
            while True:
                left = deadline - time.monotonic()
                failed = await self._exec(box, index, list(ready), env, cwd, label, max(left, 0.1))
                if failed is None:
                    break
                if time.monotonic() + 0.5 >= deadline:
                    raise BuildFailed(
                        f"the ready check did not pass within {self.ready_timeout:g} s: {failed}"
                    )
                await asyncio.sleep(0.5)
        finally:
            await box.destroy()
        self.report.event("step_end", f"{label}: passed", step=index, name="ready check")


# -- files ------------------------------------------------------------------------------


def _resolve(root: Path, rel: str, label: str) -> Path:
    """`rel` inside the context tree `root`, its symlinks resolved as if `root` were `/`
    (an absolute or `..` link never leaves it): the host's files are never read."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        path = root.joinpath(*done, part)
        if path.is_symlink():
            links += 1
            if links > _MAX_LINKS:
                raise BuildFailed(f"{label}: {rel} has too many levels of symlinks")
            target = os.readlink(path)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        done.append(part)
    return root.joinpath(*done)


def _place(tree: Path, dest: str, label: str) -> Path:
    """The path of image path `dest` in the staging `tree`, its parent directories made
    (0755), never through a symlink an earlier entry of the step put there (that would
    write on the host); an entry already at `dest` that is no directory is replaced."""
    rel = posixpath.normpath("/" + dest).lstrip("/")
    parts = rel.split("/") if rel else []
    target = tree
    for part in parts[:-1]:
        target = target / part
        if target.is_symlink():
            raise BuildFailed(f"{label}: {dest} would be written through a symlink")
        if target.exists() and not target.is_dir():
            raise BuildFailed(f"{label}: a parent of {dest} is not a directory")
        target.mkdir(mode=0o755, exist_ok=True)
    target = target / parts[-1] if parts else tree
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()
    return target


def _check_digest(source: Path, f: ContextFile, label: str) -> None:
    sha = hashlib.sha256()
    with open(source, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            sha.update(block)
    if "sha256:" + sha.hexdigest() != f.digest:
        raise BuildFailed(
            f"{label}: {f.path} in the build context is not the file the plan was made "
            "from: send the context and the build file together"
        )


def _copy_checked(source: Path, target: Path, f: ContextFile, label: str) -> None:
    if not source.is_file() or source.is_symlink():
        raise BuildFailed(f"{label}: {f.path} is not a file in the build context")
    _check_digest(source, f, label)
    shutil.copyfile(source, target, follow_symlinks=False)
    os.chmod(target, f.mode)


def _chown(value: str | None, label: str) -> tuple[int | None, int | None]:
    if not value:
        return None, None
    user, _, group = value.partition(":")
    if not user.isdigit() or (group and not group.isdigit()):
        raise BuildFailed(
            f"{label}: --chown={value}: give numeric ids (uid[:gid]); names are not looked "
            "up in the image"
        )
    return int(user), int(group) if group else None
