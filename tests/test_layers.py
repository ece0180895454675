"""The layering of DESIGN.md holds: import-linter's contracts (pyproject.toml, run by
`make lint`) keep the real tree, and break, naming the contract, when a module imports
across an arrow; and the SDK loads none of the engine, the store or the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

# What a client must never load: the engine, the store, the server, the jobs runtime.
HEAVY = (
    "corral.isolation",
    "corral.guest",
    "corral.store",
    "corral.sandboxes",
    "corral.server",
    "corral.jobs.queue",
    "corral.jobs.worker",
    "corral.jobs.runner",
    "corral.jobs.runtime",
    "corral.jobs.daemon",
    "corral.jobs.callbacks",
    "corral.jobs.callback_policy",
    "sqlalchemy",
    "alembic",
    "uvicorn",
)


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with `tree`'s pyproject.toml over the package in `tree`/src."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-logo", "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("package", "bad_import", "contract"),
    [
        ("client", "from corral.store import Store", "The SDK (corral.client) speaks only"),
        ("client", "import sqlalchemy", "The SDK (corral.client) speaks only"),
        ("cli", "from corral.jobs.queue import JobQueue", "The CLI uses the SDK"),
        ("jobs/spec", "from corral.isolation import Engine", "Shared modules"),
        ("isolation", "import httpx", "Isolation (and the guest agent) knows no HTTP"),
        ("isolation", "from corral.store import Store", "Isolation (and the guest agent)"),
        ("store", "from corral.isolation import Engine", "The store knows nothing"),
        ("images", "from corral.store import Store", "The template store"),
        ("sandboxes", "from corral.server import app", "Layers: clients"),
    ],
)
def test_an_import_across_an_arrow_breaks_its_contract(
    tmp_path: Path, package: str, bad_import: str, contract: str
) -> None:
    shutil.copytree(
        ROOT / "src" / "corral",
        tmp_path / "src" / "corral",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "src" / "corral" / package / "_crossing.py").write_text(f"{bad_import}\n")

    result = lint_imports(tmp_path)

    assert result.returncode != 0, result.stdout
    broken = result.stdout.partition("Broken contracts")[2]
    # The report wraps long lines at 80 columns; the contract's name and the offending
    # module are what a developer needs from it.
    assert contract in broken.replace("\n", ""), result.stdout
    assert f"corral.{package.replace('/', '.')}._crossing" in broken, result.stdout


def loaded_by(code: str) -> set[str]:
    """The modules `code` imports in a fresh interpreter, read from -X importtime."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.add(name)
    return names


@pytest.mark.parametrize(
    "code",
    [
        "import corral",
        "from corral import Sandbox, Jobs",
        "from corral import AsyncSandbox, AsyncJobs, JobSubmission",
        "from corral.jobs.spec import JobSpec; JobSpec.from_dict({'command': ['true']})",
        "from corral.jobs.signing import verify",
    ],
)
def test_the_sdk_loads_no_engine_store_or_server(code: str) -> None:
    loaded = loaded_by(code)
    assert "corral" in loaded  # the probe sees the imports at all
    heavy = sorted(m for m in loaded if m.split(".")[0] in ("sqlalchemy", "alembic", "uvicorn"))
    heavy += sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not heavy, f"{code!r} loads {heavy}"


def test_a_webhook_receiver_verifying_a_signature_loads_only_the_standard_library() -> None:
    loaded = loaded_by("from corral.jobs.signing import verify")
    ours = {m for m in loaded if m.split(".")[0] == "corral"}
    # corral._lazy: the package's lazy SDK exports, standard library only
    assert ours == {"corral", "corral._lazy", "corral.jobs", "corral.jobs.signing"}, ours
    assert not {"httpx", "sqlalchemy", "google.protobuf"} & loaded
