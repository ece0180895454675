"""A job's spec: what to run (its workload) and where (its sandbox), validated strictly.

The same spec arrives three ways: as a JobSpec message (the API), as a mapping read from
YAML or JSON (`corral job submit -f job.yaml`), and as JSON from the store. Each goes
through `JobSpec.from_dict` or `JobSpec.from_proto`, which refuse unknown fields, naming
them, and bad values, saying what to use instead.

Fields left out are None: the worker's default policy (`Policy`) fills them when the job
runs, so a spec shows what its submitter asked for, not what a worker chose.

    kind: workflow                      # command | shell | code | workflow
    template: host
    timeout: 300
    steps:
      - run: echo building              # a shell script
      - name: test
        command: [python3, -m, pytest]  # argv
        timeout: 120
      - code: print("hello")
        language: python
        continue_on_error: true
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from corral.errors import InvalidLimits, InvalidRequest
from corral.isolation.limits import Limits
from corral.v1 import jobs_pb2, sandbox_pb2

KINDS = ("command", "shell", "code", "workflow")
# Kinds the design has and this version does not run yet: refused by name.
LATER_KINDS = ("agent", "build", "governed")
SHELLS = ("sh", "bash")
# Interpreter argv per language; the source file's path is appended.
LANGUAGES: dict[str, tuple[str, str]] = {
    "python": ("python3", ".py"),
    "node": ("node", ".js"),
    "bash": ("bash", ".sh"),
}
NETWORKS = ("none",)
ISOLATIONS = ("auto", "namespace", "gvisor", "microvm", "process")

MAX_STEPS = 100
MAX_ARGS = 4096
MAX_TEXT = 1 << 20  # a script or source text
MAX_ENV = 256
MAX_ENV_BYTES = 64 * 1024
MAX_FILES = 256
MAX_FILES_BYTES = 6 << 20  # under the API's 8 MiB message limit
MAX_TIMEOUT = 24 * 3600
MAX_RETRIES = 20
MAX_BACKOFF = 3600.0
MAX_PRIORITY = 1000
MAX_LABELS = 64
MAX_LABEL_TEXT = 512
MAX_URL = 2048
LIMIT_FIELDS = ("memory_mib", "cpu", "pids", "disk_mib")
_LABEL_KEY = re.compile(r"[ !#-\[\]-~]{1,128}")


def _fail(where: str, message: str) -> InvalidRequest:
    where = where.rstrip(".")  # a step's prefix ("steps[0].") naming the step itself
    return InvalidRequest(f"{where}: {message}" if where else message)


def _str(where: str, value: object, *, empty: bool = False, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {type(value).__name__}")
    if not value and not empty:
        raise _fail(where, "must not be empty")
    if len(value) > limit:
        raise _fail(where, f"is {len(value)} characters; at most {limit}")
    if "\0" in value:
        raise _fail(where, "must not contain NUL characters")
    return value


def _int(where: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise _fail(where, f"{value} is out of range: use {low} to {high}")
    return value


def _argv(where: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise _fail(where, "must be a non-empty list of strings (argv), e.g. [python3, -V]")
    if len(value) > MAX_ARGS:
        raise _fail(where, f"has {len(value)} arguments; at most {MAX_ARGS}")
    argv = tuple(_str(f"{where}[{i}]", arg, empty=i > 0) for i, arg in enumerate(value))
    return argv


def _strings(where: str, value: object, *, limit: int, names: bool) -> dict[str, str]:
    """A string-to-string mapping: environment (names=True) or labels/metadata."""
    if not isinstance(value, Mapping):
        raise _fail(where, "must be a mapping of strings to strings")
    if len(value) > limit:
        raise _fail(where, f"has {len(value)} entries; at most {limit}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, bool):  # YAML's `DEBUG: true` means the text "true"
            item = "true" if item else "false"
        elif isinstance(item, int | float):  # and `PORT: 8080` the text "8080"
            item = str(item)
        if not isinstance(key, str) or not isinstance(item, str):
            raise _fail(where, f"entries must be strings, got {key!r}: {item!r}")
        if names:
            if not key or "=" in key or "\0" in key or "\0" in item:
                raise _fail(where, f"{key!r} is not a valid variable (no '=' or NUL; not empty)")
        elif not _LABEL_KEY.fullmatch(key) or len(item) > MAX_LABEL_TEXT:
            raise _fail(
                where,
                f"{key[:40]!r}: keys have 1 to 128 printable ASCII characters but no '\"' "
                f"or '\\', values at most {MAX_LABEL_TEXT} characters",
            )
        out[key] = item
    if names:
        size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in out.items())
        if size > MAX_ENV_BYTES:
            raise _fail(where, f"is {size} bytes; at most {MAX_ENV_BYTES} (put data in files)")
    return out


def check_labels(value: object, where: str = "labels") -> dict[str, str]:
    """Labels (or metadata): at most 64 printable-ASCII keys with short text values."""
    return _strings(where, value, limit=MAX_LABELS, names=False)


def _check_fields(where: str, data: object, known: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise _fail(where, f"must be a mapping, got {type(data).__name__}")
    for name in data:
        if name not in known:
            raise _fail(
                where,
                f"unknown field {name!r}; the fields are {', '.join(known)}",
            )


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
            raise _fail(where, "a step needs exactly one of command, run or code")
        kind = {"command": "command", "run": "shell", "code": "code"}[given[0]]
    needed = {"command": "command", "shell": "run", "code": "code"}[kind]
    if needed not in given:
        raise _fail(where, f"kind {kind} needs {needed!r}")
    for other in given:
        if other != needed:
            raise _fail(where, f"kind {kind} takes {needed!r}, not {other!r}")
    if kind != "shell" and data.get("shell"):
        raise _fail(where, "'shell' goes with 'run' only")
    if kind != "code" and data.get("language"):
        raise _fail(where, "'language' goes with 'code' only")
    if kind == "command":
        return Workload(command=_argv(f"{where}command", data["command"]))
    if kind == "shell":
        shell = _str(f"{where}shell", data.get("shell") or "sh")
        if shell not in SHELLS:
            raise _fail(f"{where}shell", f"{shell!r} is not supported; use sh or bash")
        return Workload(run=_str(f"{where}run", data["run"]), shell=shell)
    language = _str(f"{where}language", data.get("language") or "", empty=True)
    if language not in LANGUAGES:
        raise _fail(
            f"{where}language",
            f"{language!r} is not supported; use one of {', '.join(LANGUAGES)}"
            if language
            else f"code needs a language: one of {', '.join(LANGUAGES)}",
        )
    return Workload(code=_str(f"{where}code", data["code"]), language=language)


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
    _check_fields(where.rstrip("."), data, STEP_FIELDS)
    timeout = data.get("timeout")
    continue_on_error = data.get("continue_on_error", False)
    if not isinstance(continue_on_error, bool):
        raise _fail(f"{where}continue_on_error", "must be true or false")
    return Step(
        workload=_workload(where, data, "step"),
        name=_str(f"{where}name", data.get("name") or "", empty=True, limit=200),
        timeout=None if not timeout else _int(f"{where}timeout", timeout, 1, MAX_TIMEOUT),
        continue_on_error=continue_on_error,
        env=_strings(f"{where}env", data.get("env") or {}, limit=MAX_ENV, names=True),
    )


@dataclass(frozen=True)
class JobFile:
    path: str
    content: bytes
    mode: int = 0o644


def _files(value: object) -> tuple[JobFile, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise _fail("files", "must be a list of {path, content[, mode]}")
    if len(value) > MAX_FILES:
        raise _fail("files", f"has {len(value)} files; at most {MAX_FILES}")
    out = []
    for i, item in enumerate(value):
        where = f"files[{i}]"
        _check_fields(where, item, ("path", "content", "mode"))
        path = _str(f"{where}.path", item.get("path", ""), limit=4096)
        if ".." in path.split("/"):
            raise _fail(f"{where}.path", f"{path!r} must not contain '..'")
        content = item.get("content", b"")
        if isinstance(content, Mapping) and set(content) == {"base64"}:
            try:
                content = base64.b64decode(content["base64"], validate=True)
            except (ValueError, TypeError, binascii.Error):
                raise _fail(f"{where}.content", "base64 is not valid") from None
        if isinstance(content, str):
            content = content.encode()
        if not isinstance(content, bytes):
            raise _fail(f"{where}.content", "must be text, or {base64: ...} for binary data")
        mode = item.get("mode") or 0o644
        out.append(JobFile(path, content, _int(f"{where}.mode", mode, 0, 0o7777)))
    total = sum(len(f.content) for f in out)
    if total > MAX_FILES_BYTES:
        raise _fail("files", f"hold {total} bytes; at most {MAX_FILES_BYTES}")
    return tuple(out)


def _limits(value: object) -> dict[str, int | float]:
    _check_fields("limits", value, LIMIT_FIELDS)
    assert isinstance(value, Mapping)
    given = {k: v for k, v in value.items() if v not in (None, 0)}
    try:
        Limits(**given)  # validates each value's type and range
    except InvalidLimits as exc:
        raise _fail("limits", str(exc)) from None
    return given


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


def split_idempotency_key(data: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A spec mapping without its `idempotency_key`, and that key ("" when it has none).

    A spec file may carry the key beside the spec's fields, but the key belongs to the
    submit request (the same spec may be submitted under many keys), not to the spec.
    """
    spec = dict(data)
    key = spec.pop("idempotency_key", None)
    if key is None:
        return spec, ""
    if not isinstance(key, str):
        raise _fail("idempotency_key", f"must be a string, got {type(key).__name__}")
    return spec, key


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec; build it with `from_dict` or `from_proto`."""

    kind: str
    workload: Workload | None = None  # every kind but workflow
    steps: tuple[Step, ...] = ()  # kind workflow
    template: str | None = None
    isolation: str | None = None
    limits: Mapping[str, int | float] = field(default_factory=dict)
    network: str | None = None
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

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries

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
        _check_fields("job spec", data, FIELDS)
        kind = data.get("kind") or _infer_kind(data)
        if not isinstance(kind, str) or kind not in KINDS:
            if kind in LATER_KINDS:
                raise _fail("kind", f"{kind!r} is not built yet; use one of {', '.join(KINDS)}")
            raise _fail("kind", f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        workload: Workload | None = None
        steps: tuple[Step, ...] = ()
        if kind == "workflow":
            for name in ("command", "run", "shell", "code", "language"):
                if data.get(name):
                    raise _fail(name, "a workflow's work is in its steps; move it into a step")
            raw = data.get("steps")
            if isinstance(raw, str) or not isinstance(raw, Sequence) or not raw:
                raise _fail("steps", "a workflow needs a non-empty list of steps")
            if len(raw) > MAX_STEPS:
                raise _fail("steps", f"has {len(raw)} steps; at most {MAX_STEPS}")
            steps = tuple(_step(f"steps[{i}].", step) for i, step in enumerate(raw))
        else:
            if data.get("steps"):
                raise _fail("steps", f"only a workflow has steps, this job's kind is {kind}")
            workload = _workload("", data, kind)
        spec = cls(
            kind=kind,
            workload=workload,
            steps=steps,
            template=_optional_str("template", data, 128),
            isolation=_choice("isolation", data, ISOLATIONS),
            limits=_limits(data.get("limits") or {}),
            network=_choice("network", data, NETWORKS),
            env=_strings("env", data.get("env") or {}, limit=MAX_ENV, names=True),
            files=_files(data.get("files") or ()),
            workdir=_workdir(data.get("workdir")),
            timeout=_int("timeout", data["timeout"], 1, MAX_TIMEOUT)
            if data.get("timeout")
            else None,
            retries=_int("retries", data.get("retries") or 0, 0, MAX_RETRIES),
            retry_backoff=_backoff(data.get("retry_backoff")),
            priority=_int("priority", data.get("priority") or 0, -MAX_PRIORITY, MAX_PRIORITY),
            labels=check_labels(data.get("labels") or {}),
            metadata=check_labels(data.get("metadata") or {}, "metadata"),
            callback_url=_url(data.get("callback_url")),
        )
        return spec

    @classmethod
    def from_proto(cls, message: jobs_pb2.JobSpec) -> JobSpec:
        return cls.from_dict(proto_to_dict(message))

    # -- to the outside -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-able mapping with only the fields that were given;
        `from_dict` reads it back (file contents as text when they are UTF-8)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.workload is not None:
            out.update(_workload_dict(self.workload))
        if self.steps:
            out["steps"] = [_step_dict(step) for step in self.steps]
        if self.files:
            out["files"] = [_file_dict(f) for f in self.files]
        for f in fields(self):
            if f.name in ("kind", "workload", "steps", "files"):
                continue
            value = getattr(self, f.name)
            if value not in (None, 0, {}, ()):
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out

    def to_proto(self) -> jobs_pb2.JobSpec:
        message = jobs_pb2.JobSpec(kind=self.kind)
        if self.workload is not None:
            _workload_proto(message, self.workload)
        for step in self.steps:
            proto_step = message.steps.add(
                name=step.name,
                timeout_seconds=step.timeout or 0,
                continue_on_error=step.continue_on_error,
                env=dict(step.env),
            )
            _workload_proto(proto_step, step.workload)
        if self.limits:
            message.limits.CopyFrom(sandbox_pb2.Limits(**self.limits))  # type: ignore[arg-type]
        for f in self.files:
            message.files.add(path=f.path, content=f.content, mode=f.mode)
        message.template = self.template or ""
        message.isolation = self.isolation or ""
        message.network = self.network or ""
        message.env.update(self.env)
        message.workdir = self.workdir or ""
        message.timeout_seconds = self.timeout or 0
        message.retries = self.retries
        message.retry_backoff_seconds = self.retry_backoff or 0.0
        message.priority = self.priority
        message.labels.update(self.labels)
        message.metadata.update(self.metadata)
        message.callback_url = self.callback_url or ""
        return message


def _infer_kind(data: Mapping[str, Any]) -> str:
    given = [k for k in ("command", "run", "code", "steps") if data.get(k)]
    if len(given) != 1:
        raise _fail(
            "kind",
            "say which kind of job this is: kind: command | shell | code | workflow",
        )
    return {"command": "command", "run": "shell", "code": "code", "steps": "workflow"}[given[0]]


def _optional_str(name: str, data: Mapping[str, Any], limit: int) -> str | None:
    value = data.get(name)
    return None if not value else _str(name, value, limit=limit)


def _choice(name: str, data: Mapping[str, Any], choices: Sequence[str]) -> str | None:
    value = _optional_str(name, data, 64)
    if value is not None and value not in choices:
        raise _fail(name, f"{value!r} is not supported; use one of {', '.join(choices)}")
    return value


def _workdir(value: object) -> str | None:
    if not value:
        return None
    path = _str("workdir", value, limit=4096)
    if not path.startswith("/") or ".." in path.split("/"):
        raise _fail("workdir", f"{path!r} must be an absolute path without '..'")
    return posixpath.normpath(path)


def _backoff(value: object) -> float | None:
    if value in (None, 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail("retry_backoff", f"must be a number of seconds, got {value!r}")
    if not 0 < value <= MAX_BACKOFF:
        raise _fail("retry_backoff", f"{value} is out of range: use 0 to {MAX_BACKOFF:g}")
    return float(value)


def _url(value: object) -> str | None:
    if not value:
        return None
    url = _str("callback_url", value, limit=MAX_URL)
    if not url.startswith(("http://", "https://")) or len(url.split("/", 3)[2]) == 0:
        raise _fail("callback_url", f"{url[:80]!r} must be an http:// or https:// URL")
    return url


def _workload_dict(workload: Workload) -> dict[str, Any]:
    if workload.command:
        return {"command": list(workload.command)}
    if workload.run:
        return {
            "run": workload.run,
            **({"shell": workload.shell} if workload.shell != "sh" else {}),
        }
    return {"code": workload.code, "language": workload.language}


def _step_dict(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if step.name:
        out["name"] = step.name
    out.update(_workload_dict(step.workload))
    if step.timeout:
        out["timeout"] = step.timeout
    if step.continue_on_error:
        out["continue_on_error"] = True
    if step.env:
        out["env"] = dict(step.env)
    return out


def _file_dict(f: JobFile) -> dict[str, Any]:
    try:
        content: str | dict[str, str] = f.content.decode()
    except UnicodeDecodeError:
        content = {"base64": base64.b64encode(f.content).decode()}
    out: dict[str, Any] = {"path": f.path, "content": content}
    if f.mode != 0o644:
        out["mode"] = f.mode
    return out


def _workload_proto(message: Any, workload: Workload) -> None:
    message.command.extend(workload.command)
    message.run = workload.run
    message.shell = workload.shell if workload.run and workload.shell != "sh" else ""
    message.code = workload.code
    message.language = workload.language


def proto_to_dict(message: jobs_pb2.JobSpec) -> dict[str, Any]:
    """A JobSpec message as the mapping `JobSpec.from_dict` reads (zero fields left out)."""
    out: dict[str, Any] = {
        "kind": message.kind,
        "command": list(message.command),
        "run": message.run,
        "shell": message.shell,
        "code": message.code,
        "language": message.language,
        "steps": [
            {
                "name": s.name,
                "command": list(s.command),
                "run": s.run,
                "shell": s.shell,
                "code": s.code,
                "language": s.language,
                "timeout": s.timeout_seconds,
                "continue_on_error": s.continue_on_error,
                "env": dict(s.env),
            }
            for s in message.steps
        ],
        "template": message.template,
        "isolation": message.isolation,
        "limits": {n: getattr(message.limits, n) for n in LIMIT_FIELDS}
        if message.HasField("limits")
        else {},
        "network": message.network,
        "env": dict(message.env),
        "files": [{"path": f.path, "content": f.content, "mode": f.mode} for f in message.files],
        "workdir": message.workdir,
        "timeout": message.timeout_seconds,
        "retries": message.retries,
        "retry_backoff": message.retry_backoff_seconds,
        "priority": message.priority,
        "labels": dict(message.labels),
        "metadata": dict(message.metadata),
        "callback_url": message.callback_url,
    }
    return out
