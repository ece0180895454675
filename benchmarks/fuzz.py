"""API fuzzing, the long run: requests, server errors (5xx, `internal`), hangs.

    uv run python benchmarks/fuzz.py --json                 # 20,000 requests, seed 1
    uv run python benchmarks/fuzz.py --count 500 --seed 7   # a shorter one

Starts a `corral server` on a loopback port (no process backend: fuzzed requests get only
isolated sandboxes), gives the fuzzer of `tests/fuzzing.py` a sandbox and a job of its
own, and sends `--count` requests built from every RPC's input message and broken in
every way it knows (see that module). Prints one JSON object: the counts by answer code,
and the first failures with the request kind that caused them. `make test` runs a short
version (`tests/test_fuzz.py`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import print_report

from corral.config import Settings
from tests.conftest import start_server
from tests.fuzzing import fuzz_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--count", type=int, default=20_000, help="requests to send")
    parser.add_argument("--seconds", type=float, default=1800, help="stop after this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20, help="per request: a hang")
    args = parser.parse_args()
    runtime = Path(tempfile.mkdtemp(prefix="corral-fuzz-"))
    settings = Settings(
        data_dir=runtime / "data", runtime_dir=runtime, cgroup_parent="corral-bench"
    )
    server = start_server(
        settings, runtime / "data", pool_size=1, extra_env={"CORRAL_ALLOW_PROCESS_BACKEND": "0"}
    )
    result: dict[str, Any] = {"seed": args.seed}
    try:
        found = fuzz_server(
            server.url,
            server.key,
            seed=args.seed,
            count=args.count,
            seconds=args.seconds,
            timeout=args.timeout,
        )
        result.update(found.report.as_dict())
        result["server_alive"] = server.process.poll() is None
        result["sandbox_broken"] = found.broken
        result["playground_notes"] = found.notes
    finally:
        server.stop()
        result["server_log_errors"] = [
            line[:300]
            for line in server.log.read_text(errors="replace").splitlines()
            if '"level": "ERROR"' in line or "Traceback" in line
        ][:20]
        shutil.rmtree(runtime, ignore_errors=True)
    print_report(result, args.json)


if __name__ == "__main__":
    main()
