"""Isolation backends by name, imported lazily, and the `auto` choice."""

from __future__ import annotations

import importlib

from corral.config import Settings
from corral.errors import IsolationUnavailable, UnknownBackend
from corral.isolation.backend import Backend, Capabilities

# name -> "module:Class"; a tier's heavy imports happen only when it is used.
BACKENDS: dict[str, str] = {
    "namespace": "corral.isolation.namespace:NamespaceBackend",
    "gvisor": "corral.isolation.gvisor:GvisorBackend",
    "process": "corral.isolation.process:ProcessBackend",
    "microvm": "corral.isolation.microvm:MicrovmBackend",
}
# What `auto` tries, strongest isolation that is cheap first. Never `process`.
AUTO_ORDER: tuple[str, ...] = ("namespace",)


def backend_class(name: str) -> type[Backend]:
    try:
        target = BACKENDS[name]
    except KeyError:
        known = ", ".join(["auto", *BACKENDS])
        raise UnknownBackend(
            f"unknown isolation backend {name!r}; choose one of: {known}"
        ) from None
    module, _, cls = target.partition(":")
    backend: type[Backend] = getattr(importlib.import_module(module), cls)
    return backend


def capabilities(settings: Settings) -> dict[str, Capabilities]:
    """What every backend can do on this host (the doctor report)."""
    return {name: backend_class(name).probe(settings) for name in BACKENDS}


def unavailable(name: str, settings: Settings) -> str | None:
    """Why the tier `name` cannot run sandboxes on this host (what to install or set), or
    None when it can."""
    if name not in BACKENDS:
        return f"no {name} tier is built into this Corral (it has: {', '.join(BACKENDS)})"
    caps = backend_class(name).probe(settings)
    return None if caps.available else "; ".join(caps.missing)


def resolve(name: str, settings: Settings) -> Backend:
    """The backend for `name` ("auto" included), or an error saying what is missing."""
    if name == "auto":
        reasons = []
        for candidate in AUTO_ORDER:
            caps = backend_class(candidate).probe(settings)
            if caps.available:
                return backend_class(candidate)(settings)
            reasons.append(f"{candidate}: {'; '.join(caps.missing)}")
        raise IsolationUnavailable(
            "no isolation backend works on this host (" + " | ".join(reasons) + ")"
        )
    cls = backend_class(name)
    if reason := unavailable(name, settings):
        raise IsolationUnavailable(f"isolation backend {name!r} is unavailable here: {reason}")
    return cls(settings)
