"""What a job spec is (its workload, steps and files) and how one is built, validated,
from a mapping.

Fields left out are None: the worker's default policy (`Policy`) fills them when the job
runs, so a spec shows what its submitter asked for, not what a worker chose.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.jobs.spec._checks import (
    BUILD_KIND,
    ISOLATIONS,
    KINDS,
    LANGUAGES,
    LATER_KINDS,
    MAX_ENV,
    MAX_FILES,
    MAX_FILES_BYTES,
    MAX_PRIORITY,
    MAX_RETRIES,
    MAX_STEPS,
    MAX_TIMEOUT,
    SHELLS,
    argv_of,
    check_backoff,
    check_fields,
    check_labels,
    check_limits,
    check_network,
    check_url,
    check_workdir,
    choice,
    fail,
    optional_text,
    strings,
    text,
    whole,
)
from corral.jobs.spec._wire import proto_to_dict, spec_to_dict, spec_to_proto
from corral.network.policy import NetworkPolicy
from corral.v1 import jobs_pb2


@dataclass(frozen=True)
class Workload:
    """One thing to run: an argv, a shell script, or source text in a language."""

    command: tuple[str, ...] = ()
    run: str = ""
    shell: str = "sh"
    code: str = ""
    language: str = ""

    @property
    def kind(self) -> str:
        return "command" if self.command else "shell" if self.run else "code"

    def argv(self, source_path: str) -> list[str]:
        """The argv that runs it; `source_path` is where a code workload's source is."""
        if self.command:
            return list(self.command)
        if self.run:
            return [self.shell, "-c", self.run]
        return [LANGUAGES[self.language][0], source_path]


def _workload(where: str, data: Mapping[str, Any], kind: str) -> Workload:
    """The workload of a step (kind "step") or of a whole job of `kind`."""
    given = [name for name in ("command", "run", "code") if data.get(name)]
    if kind == "step":
        if len(given) != 1:
            raise fail(where, "a step needs exactly one of command, run or code")
        kind = {"command": "command", "run": "shell", "code": "code"}[given[0]]
    needed = {"command": "command", "shell": "run", "code": "code"}[kind]
    if needed not in given:
        raise fail(where, f"kind {kind} needs {needed!r}")
    for other in given:
        if other != needed:
            raise fail(where, f"kind {kind} takes {needed!r}, not {other!r}")
    if kind != "shell" and data.get("shell"):
        raise fail(where, "'shell' goes with 'run' only")
    if kind != "code" and data.get("language"):
        raise fail(where, "'language' goes with 'code' only")
    if kind == "command":
        return Workload(command=argv_of(f"{where}command", data["command"]))
    if kind == "shell":
        shell = text(f"{where}shell", data.get("shell") or "sh")
        if shell not in SHELLS:
            raise fail(f"{where}shell", f"{shell!r} is not supported; use sh or bash")
        return Workload(run=text(f"{where}run", data["run"]), shell=shell)
    language = text(f"{where}language", data.get("language") or "", empty=True)
    if language not in LANGUAGES:
        raise fail(
            f"{where}language",
            f"{language!r} is not supported; use one of {', '.join(LANGUAGES)}"
            if language
            else f"code needs a language: one of {', '.join(LANGUAGES)}",
        )
    return Workload(code=text(f"{where}code", data["code"]), language=language)


@dataclass(frozen=True)
class Step:
    workload: Workload
    name: str = ""
    timeout: int | None = None
    continue_on_error: bool = False
    env: Mapping[str, str] = field(default_factory=dict)

    def label(self, index: int) -> str:
        return self.name or f"step {index + 1}"


STEP_FIELDS = (
    "name",
    "command",
    "run",
    "shell",
    "code",
    "language",
    "timeout",
    "continue_on_error",
    "env",
)


def _step(where: str, data: Mapping[str, Any]) -> Step:
    check_fields(where.rstrip("."), data, STEP_FIELDS)
    timeout = data.get("timeout")
    continue_on_error = data.get("continue_on_error", False)
    if not isinstance(continue_on_error, bool):
        raise fail(f"{where}continue_on_error", "must be true or false")
    return Step(
        workload=_workload(where, data, "step"),
        name=text(f"{where}name", data.get("name") or "", empty=True, limit=200),
        timeout=None if not timeout else whole(f"{where}timeout", timeout, 1, MAX_TIMEOUT),
        continue_on_error=continue_on_error,
        env=strings(f"{where}env", data.get("env") or {}, limit=MAX_ENV, names=True),
    )


@dataclass(frozen=True)
class JobFile:
    path: str
    content: bytes
    mode: int = 0o644


def _files(value: object) -> tuple[JobFile, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise fail("files", "must be a list of {path, content[, mode]}")
    if len(value) > MAX_FILES:
        raise fail("files", f"has {len(value)} files; at most {MAX_FILES}")
    out = []
    for i, item in enumerate(value):
        where = f"files[{i}]"
        check_fields(where, item, ("path", "content", "mode"))
        path = text(f"{where}.path", item.get("path", ""), limit=4096)
        if ".." in path.split("/"):
            raise fail(f"{where}.path", f"{path!r} must not contain '..'")
        content = item.get("content", b"")
        if isinstance(content, Mapping) and set(content) == {"base64"}:
            try:
                content = base64.b64decode(content["base64"], validate=True)
            except (ValueError, TypeError, binascii.Error):
                raise fail(f"{where}.content", "base64 is not valid") from None
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, bytes):
            raise fail(f"{where}.content", "must be text, or {base64: ...} for binary data")
        mode = item.get("mode") or 0o644
        out.append(JobFile(path, content, whole(f"{where}.mode", mode, 0, 0o7777)))
    total = sum(len(f.content) for f in out)
    if total > MAX_FILES_BYTES:
        raise fail("files", f"hold {total} bytes; at most {MAX_FILES_BYTES}")
    return tuple(out)


FIELDS = (
    "kind",
    "command",
    "run",
    "shell",
    "code",
    "language",
    "steps",
    "template",
    "isolation",
    "limits",
    "network",
    "network_allow",
    "env",
    "files",
    "workdir",
    "timeout",
    "retries",
    "retry_backoff",
    "priority",
    "labels",
    "metadata",
    "callback_url",
)
BUILD_FIELDS = ("kind", "build", "timeout", "labels")


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec; build it with `from_dict` or `from_proto`."""

    kind: str
    workload: Workload | None = None  # every kind but workflow
    steps: tuple[Step, ...] = ()  # kind workflow
    template: str | None = None
    isolation: str | None = None
    limits: Mapping[str, int | float] = field(default_factory=dict)
    network: str | None = None  # a mode; None: `none`
    network_allow: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    files: tuple[JobFile, ...] = ()
    workdir: str | None = None
    timeout: int | None = None
    retries: int = 0
    retry_backoff: float | None = None
    priority: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    callback_url: str | None = None
    build: str = ""  # kind build: the id of the template row it builds

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries

    @property
    def network_policy(self) -> NetworkPolicy:
        return NetworkPolicy.parse(self.network or "none", self.network_allow)

    @property
    def workloads(self) -> tuple[Step, ...]:
        """What runs, in order: the steps of a workflow, or the one workload as a step."""
        if self.kind == "workflow":
            return self.steps
        assert self.workload is not None
        return (Step(self.workload),)

    # -- from the outside ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """Validate a spec given as a mapping (YAML, JSON); the errors name the field."""
        if isinstance(data, Mapping) and data.get("kind") == BUILD_KIND:
            return cls._build(data)
        check_fields("job spec", data, FIELDS)
        kind = data.get("kind") or _infer_kind(data)
        if not isinstance(kind, str) or kind not in KINDS:
            if kind in LATER_KINDS:
                raise fail("kind", f"{kind!r} is not built yet; use one of {', '.join(KINDS)}")
            raise fail("kind", f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        workload: Workload | None = None
        steps: tuple[Step, ...] = ()
        if kind == "workflow":
            for name in ("command", "run", "shell", "code", "language"):
                if data.get(name):
                    raise fail(name, "a workflow's work is in its steps; move it into a step")
            raw = data.get("steps")
            if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw:
                raise fail("steps", "a workflow needs a non-empty list of steps")
            if len(raw) > MAX_STEPS:
                raise fail("steps", f"has {len(raw)} steps; at most {MAX_STEPS}")
            steps = tuple(_step(f"steps[{i}].", step) for i, step in enumerate(raw))
        else:
            if data.get("steps"):
                raise fail("steps", f"only a workflow has steps, this job's kind is {kind}")
            workload = _workload("", data, kind)
        network, network_allow = check_network(data)
        spec = cls(
            kind=kind,
            workload=workload,
            steps=steps,
            template=optional_text("template", data, 128),
            isolation=choice("isolation", data, ISOLATIONS),
            limits=check_limits(data.get("limits") or {}),
            network=network,
            network_allow=network_allow,
            env=strings("env", data.get("env") or {}, limit=MAX_ENV, names=True),
            files=_files(data.get("files") or ()),
            workdir=check_workdir(data.get("workdir")),
            timeout=whole("timeout", data["timeout"], 1, MAX_TIMEOUT)
            if data.get("timeout")
            else None,
            retries=whole("retries", data.get("retries") or 0, 0, MAX_RETRIES),
            retry_backoff=check_backoff(data.get("retry_backoff")),
            priority=whole("priority", data.get("priority") or 0, -MAX_PRIORITY, MAX_PRIORITY),
            labels=check_labels(data.get("labels") or {}),
            metadata=check_labels(data.get("metadata") or {}, "metadata"),
            callback_url=check_url(data.get("callback_url")),
        )
        return spec

    @classmethod
    def _build(cls, data: Mapping[str, Any]) -> JobSpec:
        """A template build's job, as the template service makes it."""
        check_fields("build job spec", data, BUILD_FIELDS)
        build = text("build", data.get("build") or "", empty=True, limit=32)
        if not build:
            raise fail(
                "kind", "a build job is started by `corral template build` (TemplateService)"
            )
        return cls(
            kind=BUILD_KIND,
            build=build,
            timeout=whole("timeout", data["timeout"], 1, MAX_TIMEOUT)
            if data.get("timeout")
            else None,
            labels=check_labels(data.get("labels") or {}),
        )

    @classmethod
    def from_proto(cls, message: jobs_pb2.JobSpec) -> JobSpec:
        return cls.from_dict(proto_to_dict(message))

    # -- to the outside -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-able mapping with only the fields that were given;
        `from_dict` reads it back (file contents as text when they are UTF-8)."""
        return spec_to_dict(self)

    def to_proto(self) -> jobs_pb2.JobSpec:
        return spec_to_proto(self)


def _infer_kind(data: Mapping[str, Any]) -> str:
    given = [k for k in ("command", "run", "code", "steps") if data.get(k)]
    if len(given) != 1:
        raise fail(
            "kind",
            "say which kind of job this is: kind: command | shell | code | workflow",
        )
    return {"command": "command", "run": "shell", "code": "code", "steps": "workflow"}[given[0]]
