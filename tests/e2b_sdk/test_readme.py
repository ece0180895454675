"""The README's "Using the E2B SDK" promise: with only the three environment variables set
(the session sets them, as a user would), its program runs unchanged, as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from corral_server import CorralServer

# What the README tells a user to export (the session's harness also sets E2B_DOMAIN, as
# a guard: the program below runs without it, in the session's loopback-only namespace).
THREE = ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL")
README = Path(__file__).resolve().parents[2] / "README.md"


def e2b_section() -> str:
    text = README.read_text()
    start = text.index("## Using the E2B SDK")
    return text[start : text.index("\n## ", start + 1)]


def test_the_readme_names_three_variables(corral: CorralServer) -> None:
    """The shell block exports exactly the three variables, the key in E2B's shape."""
    shell = re.search(r"^```sh\n(.*?)^```$", e2b_section(), re.M | re.S)
    assert shell is not None
    exported = re.findall(r"^export (\w+)=", shell.group(1), re.M)
    assert tuple(sorted(exported)) == THREE
    assert corral.e2b_env["E2B_API_KEY"].startswith("e2b_")  # `corral admin key create --e2b`


def test_the_readme_program_runs_as_written(corral: CorralServer) -> None:
    program = re.search(r"^```python\n(.*?)^```$", e2b_section(), re.M | re.S)
    assert program is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "CORRAL_"))}
    ran = subprocess.run(
        [sys.executable, "-c", program.group(1)],
        env={**env, **{name: corral.e2b_env[name] for name in THREE}},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "user\n/home/user\n\n", ran.stdout
