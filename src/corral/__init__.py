"""Corral: isolated sandboxes for untrusted code, jobs and agents.

    from corral import Jobs, Sandbox

    with Sandbox.create() as sbx:
        print(sbx.commands.run("echo hello").stdout)
    with Jobs() as jobs:
        print(jobs.wait(jobs.submit(run="echo hello").job.id).state)

The SDK (and `__version__`) is imported on first use, so `import corral.config` (the
engine, the server) does not load it.
"""

import typing as _typing

from corral._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    __version__: str
    from corral.client import (
        AsyncCommandHandle,
        AsyncJobs,
        AsyncSandbox,
        AsyncTemplate,
        AsyncVm,
        AsyncVolume,
        BuildLog,
        CallbackStatus,
        CommandHandle,
        CommandResult,
        EntryInfo,
        Job,
        JobEvent,
        Jobs,
        JobSubmission,
        Limits,
        LogChunk,
        MetricPoint,
        Network,
        NetworkEvent,
        ProcessInfo,
        Sandbox,
        SandboxInfo,
        Template,
        TemplateInfo,
        Vm,
        VmInfo,
        Volume,
        VolumeInfo,
        VolumeSpec,
        WriteEntry,
    )
    from corral.errors import CorralError

_LAZY = {
    "Vm": "corral.client",
    "VmInfo": "corral.client",
    "AsyncVm": "corral.client",
    "VolumeSpec": "corral.client",
    "VolumeInfo": "corral.client",
    "Volume": "corral.client",
    "AsyncVolume": "corral.client",
    "AsyncCommandHandle": "corral.client",
    "AsyncJobs": "corral.client",
    "AsyncSandbox": "corral.client",
    "AsyncTemplate": "corral.client",
    "BuildLog": "corral.client",
    "CallbackStatus": "corral.client",
    "CommandHandle": "corral.client",
    "CommandResult": "corral.client",
    "CorralError": "corral.errors",
    "EntryInfo": "corral.client",
    "Job": "corral.client",
    "JobEvent": "corral.client",
    "JobSubmission": "corral.client",
    "Jobs": "corral.client",
    "Limits": "corral.client",
    "LogChunk": "corral.client",
    "MetricPoint": "corral.client",
    "Network": "corral.client",
    "NetworkEvent": "corral.client",
    "ProcessInfo": "corral.client",
    "Sandbox": "corral.client",
    "SandboxInfo": "corral.client",
    "Template": "corral.client",
    "TemplateInfo": "corral.client",
    "WriteEntry": "corral.client",
}

__all__ = [
    "AsyncCommandHandle",
    "AsyncJobs",
    "AsyncSandbox",
    "AsyncTemplate",
    "AsyncVm",
    "AsyncVolume",
    "BuildLog",
    "CallbackStatus",
    "CommandHandle",
    "CommandResult",
    "CorralError",
    "EntryInfo",
    "Job",
    "JobEvent",
    "JobSubmission",
    "Jobs",
    "Limits",
    "LogChunk",
    "MetricPoint",
    "Network",
    "NetworkEvent",
    "ProcessInfo",
    "Sandbox",
    "SandboxInfo",
    "Template",
    "TemplateInfo",
    "Vm",
    "VmInfo",
    "Volume",
    "VolumeInfo",
    "VolumeSpec",
    "WriteEntry",
    "__version__",
]


def _version() -> str:
    # On first use: importlib.metadata costs ~20 ms, more than the CLI's whole start-up.
    import importlib.metadata

    try:
        return importlib.metadata.version("corral")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree
        return "0.0.0"


_lazy_getattr, __dir__ = _lazy_exports(__name__, _LAZY, __all__)


def __getattr__(name: str) -> _typing.Any:
    if name == "__version__":
        globals()[name] = version = _version()
        return version
    return _lazy_getattr(name)
