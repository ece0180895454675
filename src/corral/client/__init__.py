"""The Python SDK: `Sandbox` and `Jobs` (sync), `AsyncSandbox` and `AsyncJobs`, one
implementation (see `_portal`)."""

from corral.client._commands import AsyncCommandHandle, AsyncCommands
from corral.client._config import ClientSettings, ConfigFile, Context
from corral.client._files import AsyncFiles
from corral.client._jobs import AsyncJobs
from corral.client._models import (
    CallbackStatus,
    CommandResult,
    EntryInfo,
    Job,
    JobEvent,
    JobSubmission,
    Limits,
    LogChunk,
    MetricPoint,
    ProcessInfo,
    SandboxInfo,
    WriteEntry,
)
from corral.client._sandbox import AsyncSandbox
from corral.client._sync import CommandHandle, Commands, Files, Jobs, Sandbox

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncJobs",
    "AsyncSandbox",
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
    "MetricPoint",
    "ProcessInfo",
    "Sandbox",
    "SandboxInfo",
    "WriteEntry",
]
