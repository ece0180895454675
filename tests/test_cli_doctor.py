"""`corral doctor` says which network modes each tier enforces here, and what to install
for the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.config import Settings
from corral.isolation import netns
from corral.isolation.registry import BACKENDS, backend_class
from corral.network.policy import MODES
from tests.kit.hostpath import path_without


def doctor_network(env: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """`corral doctor`'s network table: tier -> (modes, what to install for the others)."""
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "doctor"],
        capture_output=True,
        text=True,
        env={**os.environ, "CORRAL_ALLOW_PROCESS_BACKEND": "1", **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = next(n for n, line in enumerate(lines) if line.split()[:2] == ["backend", "network"])
    header = lines[start]
    modes_at, hint_at = header.index("network"), header.index("for the others")
    table = {}
    for line in lines[start + 1 :]:
        if not line.strip() or "memory capacity" in line:
            break
        table[line[:modes_at].strip()] = (
            line[modes_at:hint_at].strip(),
            line[hint_at:].strip(),
        )
    return table


def test_doctor_says_every_mode_when_the_host_has_what_networking_needs() -> None:
    if missing := netns.tools_missing():
        pytest.skip(f"this host cannot give sandboxes a network: {missing}")
    table = doctor_network()
    assert table["namespace"] == (", ".join(MODES), "-")
    # A tier with no network of its own offers `none` and says to use another tier.
    modes, hint = table["process"]
    assert modes == "none" and "use another tier" in hint


def test_doctor_says_what_to_install_for_the_modes_a_tier_lacks(tmp_path: Path) -> None:
    # A PATH holding every command this host has but `tc` and `nsenter`: the namespace
    # tier still works, with network `none` only, and doctor names the packages to add.
    table = doctor_network({"PATH": path_without(tmp_path / "bin", "tc", "nsenter")})
    modes, hint = table["namespace"]
    assert modes == "none"
    assert "tc: apt-get install iproute2" in hint or "nsenter" in hint, hint
    assert "apt-get install" in hint


def doctor_tiers(env: dict[str, str]) -> dict[str, list[str]]:
    """`corral doctor`'s first table: tier -> [available, platform, why not / details...]
    (a tier's further reasons are the rows under it)."""
    done = subprocess.run(
        [sys.executable, "-m", "corral.cli", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[0]
    assert header.split()[:3] == ["backend", "available", "platform"], header
    cut = [header.index(word) for word in ("available", "platform", "why not")]
    table: dict[str, list[str]] = {}
    name = ""
    for line in lines[1:]:
        if not line.strip():
            break
        cells = [line[: cut[0]], line[cut[0] : cut[1]], line[cut[1] : cut[2]], line[cut[2] :]]
        name = cells[0].strip() or name
        if cells[0].strip():
            table[name] = [cell.strip() for cell in cells[1:]]
        else:
            table[name].append(cells[3].strip())
    return table


def test_doctor_lists_every_tier_its_platform_and_why_with_no_corral_settings(
    tmp_path: Path,
) -> None:
    # As an operator runs it first: no CORRAL_* variable, no config file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["HOME"] = str(tmp_path)
    table = doctor_tiers(env)
    settings = Settings.from_env(env)
    assert list(table) == [name for name in BACKENDS if name != "process"] + ["process"]
    for name, (available, platform, *why) in table.items():
        caps = backend_class(name).probe(settings)
        assert available == ("yes" if caps.available else "no"), name
        assert platform == str(caps.details.get("platform", "-")), name
        assert platform != "-" or not caps.available, name  # a tier that runs says on what
        # What is missing, each reason on its own line; else the probe's details.
        assert why == (list(caps.missing) if caps.missing else [why[0]]), name
    assert table["namespace"][1] == "bubblewrap"
    available, _, reason = table["process"]
    assert available == "no" and "CORRAL_ALLOW_PROCESS_BACKEND=1" in reason
