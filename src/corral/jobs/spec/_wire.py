"""A job spec's wire forms: the JSON-able mapping (the store, `corral job get`) and the
API's JobSpec message, and back from the message to the mapping `JobSpec.from_dict`
reads. Free of engine, store and server imports, like the rest of the spec.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from corral.jobs.spec._checks import LIMIT_FIELDS
from corral.v1 import jobs_pb2, sandbox_pb2

if TYPE_CHECKING:
    from corral.jobs.spec._model import JobFile, JobSpec, Step, Workload


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """The spec as a JSON-able mapping with only the fields that were given;
    `from_dict` reads it back (file contents as text when they are UTF-8)."""
    out: dict[str, Any] = {"kind": spec.kind}
    if spec.workload is not None:
        out.update(_workload_dict(spec.workload))
    if spec.steps:
        out["steps"] = [_step_dict(step) for step in spec.steps]
    if spec.files:
        out["files"] = [_file_dict(f) for f in spec.files]
    for f in fields(spec):
        if f.name in ("kind", "workload", "steps", "files") or (
            f.name == "build" and not spec.build
        ):
            continue
        value = getattr(spec, f.name)
        if value not in (None, 0, {}, ()):
            if isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def spec_to_proto(spec: JobSpec) -> jobs_pb2.JobSpec:
    message = jobs_pb2.JobSpec(kind=spec.kind)
    if spec.workload is not None:
        _workload_proto(message, spec.workload)
    for step in spec.steps:
        proto_step = message.steps.add(
            name=step.name,
            timeout_seconds=step.timeout or 0,
            continue_on_error=step.continue_on_error,
            env=dict(step.env),
        )
        _workload_proto(proto_step, step.workload)
    if spec.limits:
        message.limits.CopyFrom(sandbox_pb2.Limits(**spec.limits))  # type: ignore[arg-type]
    for f in spec.files:
        message.files.add(path=f.path, content=f.content, mode=f.mode)
    message.template = spec.template or ""
    message.isolation = spec.isolation or ""
    message.network = spec.network or ""
    message.network_allow.extend(spec.network_allow)
    message.env.update(spec.env)
    message.workdir = spec.workdir or ""
    message.timeout_seconds = spec.timeout or 0
    message.retries = spec.retries
    message.retry_backoff_seconds = spec.retry_backoff or 0.0
    message.priority = spec.priority
    message.labels.update(spec.labels)
    message.metadata.update(spec.metadata)
    message.callback_url = spec.callback_url or ""
    return message


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
        "network_allow": list(message.network_allow),
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
