"""`AsyncTemplate`: build templates with E2B's builder vocabulary, and manage them.

    template = (
        AsyncTemplate()
        .from_template("debian")
        .apt_install(["curl"])
        .pip_install(["numpy"])
        .copy("app/", "/app/")
        .set_envs({"MODE": "prod"})
        .set_workdir("/app")
        .set_start_cmd("python3 serve.py", ready_cmd="curl -fs localhost:8000")
    )
    info = await AsyncTemplate.build(template, "my-app", on_build_logs=print)

The builder only packs what the API takes: E2B's builder JSON (what E2B's SDK sends,
`TemplateBase.to_json`) with a tar of the files `copy` names, a Dockerfile's text with
its directory as the context, an image reference, or a Debian base. The server parses it
(one parser for every client) and refuses bad input naming the step or line.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shlex
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from corral.client._config import ClientSettings
from corral.client._connection import Connection, call_once
from corral.client._models import BuildLog, JobEvent, Limits, LogChunk, Network, TemplateInfo
from corral.errors import BuildFailed, InvalidRequest
from corral.limits import check_build_context
from corral.v1 import templates_pb2 as pb

BuildLogCallback = Callable[[BuildLog], Awaitable[None] | None]


def _commands(value: str | Sequence[str], what: str) -> builtins.list[str]:
    if isinstance(value, str):
        value = [value]
    items = builtins.list(value)
    if not items or not all(isinstance(p, str) and p.strip() for p in items):
        raise InvalidRequest(f"{what} takes a non-empty name or list of names")
    return items


class TemplateBuilder:
    """The builder part of a template, without I/O: `AsyncTemplate` and `Template` share
    it. Each method returns the builder, so calls chain as in E2B's SDK."""

    def __init__(
        self,
        file_context_path: str | os.PathLike[str] | None = None,
        file_ignore_patterns: Sequence[str] = (),
    ) -> None:
        self._root = Path(file_context_path or os.getcwd())
        self._ignore = tuple(file_ignore_patterns)
        self._from: dict[str, Any] = {}
        self._steps: builtins.list[dict[str, Any]] = []
        self._copies: builtins.list[str] = []
        self._start_cmd = ""
        self._ready_cmd = ""
        # A Dockerfile or recipe: (kind, its text, its directory when read from a file).
        self._source: tuple[str, str, Path | None] | None = None
        self._debian: pb.DebianSource | None = None
        # The template's defaults for its sandboxes (not the build's RUN steps).
        self._limits: Limits | None = None
        self._network: Network | None = None

    # -- bases ------------------------------------------------------------------------------

    def _base(self) -> None:
        if self._from or self._source or self._debian:
            raise InvalidRequest(
                "this template already has a base (from_image, from_template, from_debian, "
                "from_dockerfile or from_recipe): give one"
            )

    def from_image(
        self, image: str, username: str | None = None, password: str | None = None
    ) -> Self:
        """Start from an OCI image (`registry/name:tag`), with registry credentials."""
        self._base()
        self._from = {"fromImage": image}
        if username or password:
            self._from["fromImageRegistry"] = {
                "type": "registry",
                "username": username or "",
                "password": password or "",
            }
        return self

    def from_template(self, template: str) -> Self:
        """Start from another template of your team."""
        self._base()
        self._from = {"fromTemplate": template}
        return self

    def from_debian(
        self, suite: str = "bookworm", packages: Sequence[str] = (), variant: str = "apt"
    ) -> Self:
        """A Debian base bootstrapped from the server's mirror with `packages` in it. It
        is a build of its own: add steps in a template `from_template` it."""
        self._base()
        self._debian = pb.DebianSource(
            suite=suite, variant=variant, packages=builtins.list(packages)
        )
        return self

    def from_dockerfile(self, dockerfile: str | os.PathLike[str]) -> Self:
        """A Dockerfile, by path (its directory is the build context) or as text (the
        builder's `file_context_path` is). The Dockerfile is the whole build."""
        return self._text("dockerfile", dockerfile)

    def from_recipe(self, recipe: str | os.PathLike[str]) -> Self:
        """A YAML recipe (`from:`, `steps:`, `start:`, `ready:`), by path or as text, its
        context as for `from_dockerfile`. The recipe is the whole build."""
        return self._text("recipe", recipe)

    def _text(self, kind: str, value: str | os.PathLike[str]) -> Self:
        self._base()
        is_path = isinstance(value, os.PathLike) or "\n" not in value
        if is_path and Path(value).is_file():
            path = Path(value)
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"cannot read the {kind} {path}: {exc}") from None
            self._source = (kind, text, path.resolve().parent)
        elif isinstance(value, os.PathLike):
            raise InvalidRequest(f"from_{kind}: {value} is not a file")
        else:
            self._source = (kind, value, None)
        return self

    # -- steps ------------------------------------------------------------------------------

    def _step(self, kind: str, args: builtins.list[str], force: bool = False) -> Self:
        self._steps.append({"type": kind, "args": args, "force": force})
        return self

    def run_cmd(self, command: str | Sequence[str], user: str | None = None) -> Self:
        """Run a shell command (a list: each in turn, joined with &&) as the build's
        user, or as `user`."""
        text = command if isinstance(command, str) else " && ".join(command)
        if not text.strip():
            raise InvalidRequest("run_cmd takes a command")
        return self._step("RUN", [text, user] if user else [text])

    def apt_install(
        self, packages: str | Sequence[str], no_install_recommends: bool = False
    ) -> Self:
        names = shlex.join(_commands(packages, "apt_install"))
        flags = "--no-install-recommends " if no_install_recommends else ""
        return self.run_cmd(
            "apt-get update && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes "
            f"apt-get install -y {flags}{names}",
            user="root",
        )

    def pip_install(self, packages: str | Sequence[str] | None = None, g: bool = True) -> Self:
        args = shlex.join(_commands(packages, "pip_install")) if packages else "."
        return self.run_cmd(
            f"pip install {'' if g else '--user '}{args}", user="root" if g else None
        )

    def npm_install(self, packages: str | Sequence[str] | None = None, g: bool = False) -> Self:
        args = shlex.join(_commands(packages, "npm_install")) if packages else ""
        return self.run_cmd(
            f"npm install {'-g ' if g else ''}{args}".rstrip(), user="root" if g else None
        )

    def copy(
        self,
        src: str | os.PathLike[str],
        dest: str,
        force_upload: bool = False,
        user: str | None = None,
        mode: int | None = None,
    ) -> Self:
        """Copy `src` (relative to `file_context_path`; a glob, a file or a directory)
        to `dest` in the template."""
        source = os.fspath(src)
        if not source or os.path.isabs(source) or ".." in Path(source).parts:
            raise InvalidRequest(
                f"copy({source!r}): name a path inside file_context_path ({self._root}), "
                "relative to it"
            )
        self._copies.append(source)
        args = [source, dest, user or "", f"{mode:o}" if mode is not None else ""]
        while args and not args[-1]:
            args.pop()
        return self._step("COPY", args, force_upload)

    def set_envs(self, envs: Mapping[str, str]) -> Self:
        return self._step("ENV", [x for pair in envs.items() for x in pair]) if envs else self

    def set_workdir(self, workdir: str) -> Self:
        return self._step("WORKDIR", [workdir])

    def set_user(self, user: str) -> Self:
        return self._step("USER", [user])

    def set_start_cmd(self, start_cmd: str, ready_cmd: str | None = None) -> Self:
        """The command every sandbox of the template starts with, and the check that
        must pass (at build time) before the template is ready."""
        self._start_cmd = start_cmd
        if ready_cmd:
            self._ready_cmd = ready_cmd
        return self

    def set_ready_cmd(self, ready_cmd: str) -> Self:
        self._ready_cmd = ready_cmd
        return self

    def set_limits(self, limits: Limits | None = None, **fields: float) -> Self:
        """The template's default limits: a sandbox or job started from it takes each
        one its request leaves unset (`set_limits(memory_mib=1024, cpu=2)`)."""
        if limits is not None and fields:
            raise InvalidRequest("set_limits takes a Limits or fields (memory_mib=...), not both")
        try:
            self._limits = limits if limits is not None else Limits(**fields)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InvalidRequest(f"set_limits: {exc}") from None
        self._limits.to_proto()  # checked now, as it would be when sent
        return self

    def set_network(self, network: Network | str | Mapping[str, Any]) -> Self:
        """The template's default network policy: a sandbox or job started from it that
        names none gets this one (the build's RUN steps get `build(..., network=)`)."""
        self._network = Network.of(network)
        return self

    # -- what is sent -----------------------------------------------------------------------

    def to_json(self) -> str:
        """The builder as E2B's SDK serialises it (what the server parses)."""
        return json.dumps(
            {
                **self._from,
                "steps": self._steps,
                "startCmd": self._start_cmd,
                "readyCmd": self._ready_cmd,
            }
        )

    def to_request(self, name: str) -> pb.BuildTemplateRequest:
        """The Build request: the source and its context tar (bounded)."""
        request = pb.BuildTemplateRequest(name=name)
        if self._source is not None or self._debian is not None:
            if self._steps or self._start_cmd:
                base = f"from_{self._source[0]}" if self._source else "from_debian"
                raise InvalidRequest(
                    f"{base} is the whole build: put the steps in it, or build this as a "
                    "template and add steps in another that starts from_template(it)"
                )
            if self._debian is not None:
                request.debian.CopyFrom(self._debian)
            else:
                kind, text, directory = self._source  # type: ignore[misc]
                setattr(request, kind, text)
                request.context = _tar(directory or self._root, ["."], self._ignore)
        elif not self._from:
            raise InvalidRequest(
                "the template has no base: start with from_image(...), from_template(...), "
                "from_debian(...), from_dockerfile(...) or from_recipe(...)"
            )
        else:
            request.e2b_template = self.to_json()
            if self._copies:
                request.context = _tar(self._root, self._copies, self._ignore)
        if self._ready_cmd and not request.e2b_template:  # E2B's JSON has its own readyCmd
            request.ready_cmd = self._ready_cmd
        if self._limits is not None:
            request.sandbox_limits.CopyFrom(self._limits.to_proto())
        if self._network is not None:
            request.sandbox_network.CopyFrom(self._network.to_proto())
        return request


def _tar(root: Path, sources: Iterable[str], ignore: Sequence[str]) -> bytes:
    """The named files (globs allowed) under `root` as a tar, symlinks kept as links; the
    size is checked before anything is sent."""
    if not root.is_dir():
        raise InvalidRequest(f"the build context {root} is not a directory")
    names: set[str] = set()
    for source in sources:
        matches = sorted(root.glob(source)) if any(c in source for c in "*?[") else [root / source]
        if not matches or not all(os.path.lexists(m) for m in matches):
            raise InvalidRequest(f"copy({source!r}): nothing of that name in {root}")
        for match in matches:
            names.add(os.path.relpath(match, root))
    buffer = io.BytesIO()
    dockerignore = None
    if (root / ".dockerignore").is_file():  # not sent what the build would not see
        from corral.images._context import BuildContext

        dockerignore = BuildContext(root)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        path = Path(info.name)
        if any(path.match(pattern) for pattern in ignore):
            return None
        rel = os.path.normpath(info.name)
        if dockerignore is not None and rel != ".dockerignore" and dockerignore.ignored(rel):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(names):
            tar.add(root / name, arcname=name, filter=keep)
            check_build_context(buffer.tell())
    return buffer.getvalue()


def _settings(
    server: str | None,
    api_key: str | None,
    context: str | None,
    ca_file: str | os.PathLike[str] | None,
) -> ClientSettings:
    return ClientSettings.resolve(server=server, api_key=api_key, context=context, ca_file=ca_file)


def _connect(
    server: str | None,
    api_key: str | None,
    context: str | None,
    ca_file: str | os.PathLike[str] | None,
) -> Connection:
    return Connection(_settings(server, api_key, context, ca_file))


class AsyncTemplate(TemplateBuilder):
    """A template to build (the builder) and your team's templates (the static methods).
    The server and API key come from the arguments, else `CORRAL_SERVER` and
    `CORRAL_API_KEY`, else the CLI's current context."""

    @staticmethod
    async def build(
        template: TemplateBuilder,
        name: str,
        *,
        on_build_logs: BuildLogCallback | None = None,
        build_args: Mapping[str, str] | None = None,
        network: Network | str | Mapping[str, Any] | None = None,
        ready_timeout: float = 60,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> TemplateInfo:
        """Build `template` as `name` and wait for the end, handing each log chunk and
        progress event to `on_build_logs`. Returns the ready template; raises BuildFailed
        (with the failed step and its log tail) if it failed or was cancelled."""
        info = await AsyncTemplate.build_in_background(
            template, name, build_args=build_args, network=network, ready_timeout=ready_timeout,
            server=server, api_key=api_key, context=context, ca_file=ca_file,
        )  # fmt: skip
        async for entry in AsyncTemplate.logs(
            name, follow=True, server=server, api_key=api_key, context=context, ca_file=ca_file
        ):
            if on_build_logs is not None:
                result = on_build_logs(entry)
                if result is not None:
                    await result
        info = await AsyncTemplate.get(
            name, server=server, api_key=api_key, context=context, ca_file=ca_file
        )
        if info.state != "ready":
            raise BuildFailed(
                f"template {name} {info.state}: {info.error or 'see its logs'} "
                f"(corral template logs {name})"
            )
        return info

    @staticmethod
    async def build_in_background(
        template: TemplateBuilder,
        name: str,
        *,
        build_args: Mapping[str, str] | None = None,
        network: Network | str | Mapping[str, Any] | None = None,
        ready_timeout: float = 60,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> TemplateInfo:
        """Start the build and return the template, `building`."""
        if not isinstance(template, TemplateBuilder):
            raise InvalidRequest(
                f"build(template, name) takes a Template, not {type(template).__name__}"
            )
        request = template.to_request(name)
        request.build_args.update(build_args or {})
        request.network.CopyFrom(Network.of(network).to_proto())
        if not ready_timeout > 0:
            raise InvalidRequest(f"ready_timeout={ready_timeout!r}: give seconds > 0")
        request.ready_timeout_seconds = ready_timeout
        reply = await call_once(
            lambda c: c.templates.build, request, _settings(server, api_key, context, ca_file)
        )
        return TemplateInfo.from_proto(reply.template)

    @staticmethod
    async def get(
        name: str,
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> TemplateInfo:
        request = pb.GetTemplateRequest(name=name)
        reply = await call_once(
            lambda c: c.templates.get, request, _settings(server, api_key, context, ca_file)
        )
        return TemplateInfo.from_proto(reply.template)

    @staticmethod
    async def list(
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> builtins.list[TemplateInfo]:
        request = pb.ListTemplatesRequest()
        reply = await call_once(
            lambda c: c.templates.list, request, _settings(server, api_key, context, ca_file)
        )
        return [TemplateInfo.from_proto(t) for t in reply.templates]

    @staticmethod
    async def delete(
        name: str,
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """Remove a template; refused (TemplateInUse) while a sandbox uses it."""
        request = pb.DeleteTemplateRequest(name=name)
        await call_once(
            lambda c: c.templates.delete, request, _settings(server, api_key, context, ca_file)
        )

    @staticmethod
    async def cancel(
        name: str,
        *,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> TemplateInfo:
        """Stop the template's build; a finished template is returned as it is."""
        request = pb.CancelBuildRequest(name=name)
        reply = await call_once(
            lambda c: c.templates.cancel, request, _settings(server, api_key, context, ca_file)
        )
        return TemplateInfo.from_proto(reply.template)

    @staticmethod
    async def logs(
        name: str,
        *,
        offset: int = 0,
        event_offset: int = 0,
        follow: bool = False,
        server: str | None = None,
        api_key: str | None = None,
        context: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> AsyncIterator[BuildLog]:
        """The build's log chunks (from chunk `offset`) and events (from `event_offset`),
        in the order they came; with `follow`, until the build ends."""
        for value, what in ((offset, "offset"), (event_offset, "event_offset")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequest(f"{what}={value!r} must be a whole number >= 0")
        connection = _connect(server, api_key, context, ca_file)
        request = pb.StreamBuildLogsRequest(
            name=name, offset=offset, event_offset=event_offset, follow=follow
        )
        try:
            async for message in connection.stream(connection.templates.stream_build_logs, request):
                for event in message.events:
                    yield BuildLog(event=JobEvent.from_proto(event))
                for chunk in message.chunks:
                    label = message.step_labels.get(chunk.step, "")
                    yield BuildLog(label=label, chunk=LogChunk.from_proto(chunk))
        finally:
            await connection.aclose()
