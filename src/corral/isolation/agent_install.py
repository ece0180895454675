"""Put the guest agent where every sandbox can read it.

The agent's files (`AGENT_FILES`) are copied once per process into ``<runtime_dir>/guest/<digest>``
(world-readable, so sandboxes running as unprivileged host uids can read it even when
Corral itself is installed under /root) and byte-compiled with the interpreter that will
run them, so the agent starts without compiling anything.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from corral.errors import IsolationUnavailable
from corral.guest import AGENT_FILES, agent_source_dir


def agent_command(agent_dir: str, python: str, workdir: str) -> list[str]:
    """The argv that starts the agent from `agent_dir` (a path as the sandbox sees it)."""
    # -E -s -S: no environment, no site-packages, no site module — fast and hermetic.
    # Importing (rather than running the file) uses the precompiled bytecode.
    bootstrap = f"import sys; sys.path.insert(0, {agent_dir!r}); import agent; agent.main()"
    return [python, "-E", "-s", "-S", "-c", bootstrap, "--workdir", workdir]


@functools.cache
def install_agent(runtime_dir: Path, python: str) -> Path:
    source = agent_source_dir()
    digest = hashlib.sha256(python.encode())
    for name in AGENT_FILES:
        digest.update((source / name).read_bytes())
    target = runtime_dir / "guest" / digest.hexdigest()[:16]
    if (target / "ready").exists():
        return target
    if not os.access(python, os.X_OK):
        raise IsolationUnavailable(
            f"the guest agent needs {python} on the host; install python3 "
            "(apt-get install python3) or set CORRAL_GUEST_PYTHON"
        )
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    for name in AGENT_FILES:
        shutil.copyfile(source / name, staging / name)
    compiled = subprocess.run(
        [python, "-m", "compileall", "-q", str(staging)], capture_output=True, text=True
    )
    if compiled.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise IsolationUnavailable(
            f"{python} could not compile the guest agent ({compiled.stderr.strip()[-200:]}); "
            "point CORRAL_GUEST_PYTHON at a Python 3.9+ interpreter"
        )
    for path in [staging, *staging.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (staging / "ready").touch(mode=0o644)
    try:
        staging.rename(target)
    except OSError:  # another process installed the same digest first
        shutil.rmtree(staging, ignore_errors=True)
    return target
