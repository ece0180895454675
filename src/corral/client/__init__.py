"""The Python SDK: `Sandbox`, `Jobs` and `Template` (sync), `AsyncSandbox`, `AsyncJobs`
and `AsyncTemplate`, one implementation (see `_portal`).

Each name is imported on first use, so that a light module of the SDK (`_listing`, which
the CLI uses to list sandboxes) loads without the rest (asyncio, the RPC runtime).
"""

import typing as _typing

from corral._lazy import lazy_exports as _lazy_exports

if _typing.TYPE_CHECKING:
    from corral.client._commands import (
        AsyncCommandHandle,
        AsyncCommands,
    )
    from corral.client._config import (
        ClientSettings,
        ConfigFile,
        Context,
    )
    from corral.client._files import AsyncFiles
    from corral.client._jobs import AsyncJobs
    from corral.client._models import (
        BuildLog,
        CallbackStatus,
        CommandResult,
        EntryInfo,
        Job,
        JobEvent,
        JobSubmission,
        Limits,
        LogChunk,
        MemoryImageInfo,
        MetricPoint,
        Network,
        NetworkEvent,
        ProcessInfo,
        SandboxInfo,
        TemplateInfo,
        VmInfo,
        VolumeInfo,
        WriteEntry,
    )
    from corral.client._pty import AsyncPty
    from corral.client._sandbox import AsyncSandbox
    from corral.client._sync import (
        CommandHandle,
        Commands,
        Files,
        Jobs,
        Pty,
        Sandbox,
        Template,
        Vm,
        Volume,
    )
    from corral.client._templates import AsyncTemplate
    from corral.client._vms import AsyncVm
    from corral.client._volumes import AsyncVolume
    from corral.volumes import VolumeSpec

_LAZY = {
    "Vm": "corral.client._sync",
    "VmInfo": "corral.client._models",
    "AsyncVm": "corral.client._vms",
    "VolumeSpec": "corral.volumes",
    "VolumeInfo": "corral.client._models",
    "Volume": "corral.client._sync",
    "AsyncVolume": "corral.client._volumes",
    "AsyncCommandHandle": "corral.client._commands",
    "AsyncCommands": "corral.client._commands",
    "AsyncFiles": "corral.client._files",
    "AsyncJobs": "corral.client._jobs",
    "AsyncPty": "corral.client._pty",
    "AsyncSandbox": "corral.client._sandbox",
    "AsyncTemplate": "corral.client._templates",
    "BuildLog": "corral.client._models",
    "CallbackStatus": "corral.client._models",
    "ClientSettings": "corral.client._config",
    "CommandHandle": "corral.client._sync",
    "CommandResult": "corral.client._models",
    "Commands": "corral.client._sync",
    "ConfigFile": "corral.client._config",
    "Context": "corral.client._config",
    "EntryInfo": "corral.client._models",
    "Files": "corral.client._sync",
    "Job": "corral.client._models",
    "JobEvent": "corral.client._models",
    "JobSubmission": "corral.client._models",
    "Jobs": "corral.client._sync",
    "Limits": "corral.client._models",
    "LogChunk": "corral.client._models",
    "MetricPoint": "corral.client._models",
    "Network": "corral.client._models",
    "MemoryImageInfo": "corral.client._models",
    "NetworkEvent": "corral.client._models",
    "ProcessInfo": "corral.client._models",
    "Pty": "corral.client._sync",
    "Sandbox": "corral.client._sync",
    "SandboxInfo": "corral.client._models",
    "Template": "corral.client._sync",
    "TemplateInfo": "corral.client._models",
    "WriteEntry": "corral.client._models",
}

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncJobs",
    "AsyncPty",
    "AsyncSandbox",
    "AsyncTemplate",
    "AsyncVm",
    "AsyncVolume",
    "BuildLog",
    "CallbackStatus",
    "ClientSettings",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "ConfigFile",
    "Context",
    "EntryInfo",
    "Files",
    "Job",
    "JobEvent",
    "JobSubmission",
    "Jobs",
    "Limits",
    "LogChunk",
    "MemoryImageInfo",
    "MetricPoint",
    "Network",
    "NetworkEvent",
    "ProcessInfo",
    "Pty",
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
]


__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, __all__)
