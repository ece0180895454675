"""The Python SDK: `Sandbox` (sync) and `AsyncSandbox`, one implementation (see `_portal`)."""

from corral.client._commands import AsyncCommandHandle, AsyncCommands
from corral.client._config import ClientSettings, ConfigFile, Context
from corral.client._files import AsyncFiles
from corral.client._models import (
    CommandResult,
    EntryInfo,
    Limits,
    MetricPoint,
    ProcessInfo,
    SandboxInfo,
)
from corral.client._sandbox import AsyncSandbox
from corral.client._sync import CommandHandle, Commands, Files, Sandbox

__all__ = [
    "AsyncCommandHandle",
    "AsyncCommands",
    "AsyncFiles",
    "AsyncSandbox",
    "ClientSettings",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "ConfigFile",
    "Context",
    "EntryInfo",
    "Files",
    "Limits",
    "MetricPoint",
    "ProcessInfo",
    "Sandbox",
    "SandboxInfo",
]
