"""CLI benchmark: wall time of `corral --help` and `corral sandbox list`, beside bare Python.

    uv run python benchmarks/cli.py --json

People run `corral` in loops and scripts, so its start-up is most of what a command costs:
the server answers a list in a few milliseconds. Each command is run as a user runs it
(the installed `corral` script, a fresh process each time, stdout to a pipe) against a real
server on loopback holding three sandboxes; `python -c pass` with the same interpreter is
the baseline, measured in the same rounds. The rounds alternate the commands so that the
machine's noise falls on all of them alike. Bytecode is on, as on a user's machine (this
benchmark unsets PYTHONDONTWRITEBYTECODE and warms every command first). Prints one JSON
object; times in milliseconds. Target (2 cores): p50 <= 150 ms for both commands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api import running_server
from engine import percentiles, run_cli

from corral import Sandbox

WARMUP = 3


def _wall_ms(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed ({done.returncode}): {done.stderr.decode()}")
    return elapsed


def main(quick: bool) -> dict[str, Any]:
    runs = 5 if quick else 20
    corral = str(Path(sys.executable).with_name("corral"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    root = Path(tempfile.mkdtemp(prefix="corral-bench-cli-"))
    os.chmod(root, 0o711)
    try:
        with running_server(root, "cli", pool_size=0) as (url, key):
            boxes = [
                Sandbox.create(server=url, api_key=key, metadata={"bench": "cli"}) for _ in range(3)
            ]
            try:
                commands = {
                    "python_pass": [sys.executable, "-c", "pass"],
                    "corral_help": [corral, "--help"],
                    "sandbox_list": [corral, "--server", url, "--api-key", key, "sandbox", "list"],
                }
                for argv in commands.values():
                    for _ in range(WARMUP):
                        _wall_ms(argv, env)
                samples: dict[str, list[float]] = {name: [] for name in commands}
                for _ in range(runs):
                    for name, argv in commands.items():
                        samples[name].append(_wall_ms(argv, env))
            finally:
                for box in boxes:
                    box.kill()
                    box.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = {
        f"{name}_ms": {**percentiles(values, 50, 90), "n": len(values)}
        for name, values in samples.items()
    }
    baseline = report["python_pass_ms"]["p50"]
    for name in ("corral_help", "sandbox_list"):
        p50 = report[f"{name}_ms"]["p50"]
        report[f"{name}_over_python_ms"] = round(p50 - baseline, 1)
        report[f"{name}_target_met"] = p50 <= 150
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
