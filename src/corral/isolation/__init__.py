"""The sandbox engine: isolation tiers, limits, and the sandbox lifecycle.

Tiers (`Backend` subclasses, chosen by name or `auto`): `namespace` (bubblewrap),
`process` (no isolation; development only). Later: `gvisor`, `microvm`.
"""

from corral.isolation.backend import Backend, Capabilities, Entrypoint, SandboxSpec, SeedFile
from corral.isolation.command import Command, CommandResult
from corral.isolation.engine import Engine
from corral.isolation.registry import capabilities
from corral.isolation.sandbox import Sandbox, SandboxState, Usage
from corral.limits import Limits

__all__ = [
    "Backend",
    "Capabilities",
    "Command",
    "CommandResult",
    "Engine",
    "Entrypoint",
    "Limits",
    "Sandbox",
    "SandboxSpec",
    "SandboxState",
    "SeedFile",
    "Usage",
    "capabilities",
]
