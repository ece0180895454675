"""A build plan as JSON, both ways: the catalog stores it in the template's row and the
build job reads it back (a plan is parsed once, by the server, never again)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from corral.images import Base, BuildPlan, BuildStep, ContextFile


def plan_to_dict(plan: BuildPlan) -> dict[str, Any]:
    return asdict(plan)


def plan_from_dict(data: dict[str, Any]) -> BuildPlan:
    base = Base(**data["base"])
    steps = tuple(
        BuildStep(
            kind=step["kind"],
            args=tuple(step["args"]),
            line=step["line"],
            options=tuple((name, value) for name, value in step["options"]),
            files=tuple(ContextFile(**f) for f in step["files"]),
            no_cache=step["no_cache"],
        )
        for step in data["steps"]
    )
    return BuildPlan(base, steps, tuple(data.get("notes", ())))


def without_secrets(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan as a log or listing may show it: no registry password."""
    base = {f.name: plan["base"].get(f.name) for f in fields(Base)}
    base["password"] = ""
    return {**plan, "base": base}
