"""E2B benchmark: the official `e2b` SDK beside Corral's own SDK, same server, same run.

    uv run --frozen python benchmarks/e2b.py --json

One Corral server (tests/e2b_sdk/corral_server.py: `base` installed, an `e2b_` key, in a
network namespace with loopback only) serves both clients, one after the other, the same
operations on the same template: `base` (E2B's default, which no warm pool holds: each
create starts a sandbox) and `host` (the server's warm pool: a create claims one):

- create → `commands.run("echo hi")` → kill, 100 times in sequence: the whole cycle, and
  create → first output (the echo's result), p50/p95/p99;
- `commands.run("true")` round trip on one sandbox (after a warm-up);
- a 10 MB file written, then read back (and compared).

Corral's SDK runs in this process; the `e2b` SDK cannot share Corral's venv, so this same
file runs again in tests/e2b_sdk's environment (`--sdk e2b`) and prints its raw samples,
which are reduced here the same way. Note that E2B's `commands.run` is `bash -l -c CMD` (a
login shell) where Corral's is `sh -c CMD`: part of the E2B path's cost is that shell.
Targets: the E2B path within 1.5x of Corral's own; create → first output p50 <= 30 ms warm.
Latencies in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
E2B_ENV = ROOT / "tests" / "e2b_sdk"
# base: E2B's default, started per create; host: what the server's warm pool holds.
TEMPLATES = ("base", "host")
FILE_BYTES = 10 * 1024 * 1024
FILE_PATH = "/tmp/corral-bench-10mb.bin"


async def samples(
    sdk: str, template: str, cycles: int, roundtrips: int, file_reps: int
) -> dict[str, Any]:
    """The raw samples (ms) of one SDK; the E2B SDK reads its server from E2B_* variables,
    Corral's from CORRAL_SERVER and CORRAL_API_KEY."""
    if sdk == "e2b":
        from e2b import AsyncSandbox as E2bSandbox

        sandbox_class: Any = E2bSandbox
    else:
        from corral import AsyncSandbox as CorralSandbox

        sandbox_class = CorralSandbox
    out: dict[str, Any] = {"cycle": [], "first_output": [], "errors": []}

    async def close(sandbox: Any) -> None:
        await sandbox.kill()
        if hasattr(sandbox, "aclose"):  # Corral's client holds a connection
            await sandbox.aclose()

    for index in range(cycles + 3):  # the first three warm the client and the server up
        try:
            started = time.perf_counter()
            sandbox = await sandbox_class.create(template, timeout=60)
            result = await sandbox.commands.run("echo hi")
            first = time.perf_counter()
            await close(sandbox)
            done = time.perf_counter()
            if result.stdout != "hi\n":
                raise AssertionError(f"echo hi printed {result.stdout!r}")
        except Exception as exc:
            out["errors"].append(f"cycle: {type(exc).__name__}: {exc}"[:300])
            continue
        if index >= 3:
            out["first_output"].append((first - started) * 1000)
            out["cycle"].append((done - started) * 1000)

    out |= {"roundtrip": [], "write_10mb": [], "read_10mb": []}
    try:
        sandbox = await sandbox_class.create(template, timeout=300)
    except Exception as exc:
        out["errors"].append(f"create: {type(exc).__name__}: {exc}"[:300])
        return out
    try:
        for index in range(roundtrips + 20):
            started = time.perf_counter()
            await sandbox.commands.run("true")
            if index >= 20:
                out["roundtrip"].append((time.perf_counter() - started) * 1000)
        data = secrets.token_bytes(FILE_BYTES)
        for _ in range(file_reps):
            started = time.perf_counter()
            await sandbox.files.write(FILE_PATH, data)
            written = time.perf_counter()
            back = await sandbox.files.read(FILE_PATH, format="bytes")
            read = time.perf_counter()
            if bytes(back) != data:
                raise AssertionError(f"the 10 MB file read back differs ({len(back)} bytes)")
            out["write_10mb"].append((written - started) * 1000)
            out["read_10mb"].append((read - written) * 1000)
    except Exception as exc:
        out["errors"].append(f"roundtrip/files: {type(exc).__name__}: {exc}"[:300])
    finally:
        await close(sandbox)
    return out


def e2b_samples(
    e2b_env: dict[str, str], template: str, sizes: tuple[int, int, int]
) -> dict[str, Any]:
    """This file with `--sdk e2b`, in tests/e2b_sdk's environment: its samples."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "VIRTUAL_ENV"))}
    done = subprocess.run(
        [
            "uv",
            "run",
            "--project",
            str(E2B_ENV),
            "--frozen",
            "python",
            __file__,
            "--sdk",
            "e2b",
            "--template",
            template,
            "--sizes",
            ",".join(map(str, sizes)),
        ],
        env={**env, **e2b_env},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"errors": [f"the e2b run exited {done.returncode}: {done.stderr[-2000:]}"]}
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


def reduce(raw: dict[str, Any]) -> dict[str, Any]:
    from engine import percentiles

    figures: dict[str, Any] = {}
    for name, points in (
        ("cycle", (50, 95, 99)),
        ("first_output", (50, 95, 99)),
        ("roundtrip", (50, 95, 99)),
        ("write_10mb", (50, 95)),
        ("read_10mb", (50, 95)),
    ):
        values = raw.get(name) or []
        found = percentiles(values, *points) if values else {}
        figures[f"{name}_ms"] = {**found, "n": len(values)}
    figures["errors"] = raw.get("errors", [])[:5]
    figures["error_count"] = len(raw.get("errors", []))
    return figures


def main(quick: bool) -> dict[str, Any]:
    sys.path.insert(0, str(E2B_ENV))
    import corral_server

    sizes = (20, 100, 3) if quick else (100, 500, 10)
    load_before = os.getloadavg()
    corral_server.isolate_network()
    report: dict[str, Any] = {}
    with corral_server.running(pool_size=2) as server:
        os.environ["CORRAL_SERVER"], os.environ["CORRAL_API_KEY"] = server.url, server.key
        for template in TEMPLATES:
            corral = reduce(asyncio.run(samples("corral", template, *sizes)))
            e2b = reduce(e2b_samples(server.e2b_env, template, sizes))
            ratios = {
                name: round(e2b[name]["p50"] / corral[name]["p50"], 2)
                for name in corral
                if name.endswith("_ms") and "p50" in corral[name] and "p50" in e2b.get(name, {})
            }
            report[template] = {"e2b_sdk": e2b, "corral_sdk": corral, "e2b_over_corral_p50": ratios}
    return {
        **report,
        "cycles": sizes[0],
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def driver() -> None:
    """`--sdk e2b --template T --sizes C,R,F`: print one SDK's raw samples as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--sdk", choices=("e2b", "corral"), required=True)
    parser.add_argument("--template", required=True)
    parser.add_argument("--sizes", required=True)
    args = parser.parse_args()
    cycles, roundtrips, file_reps = (int(x) for x in args.sizes.split(","))
    raw = asyncio.run(samples(args.sdk, args.template, cycles, roundtrips, file_reps))
    print(json.dumps(raw), flush=True)
    # The SDK's HTTP client (pyqwest) keeps native threads that abort the interpreter's
    # shutdown ("PyGILState_Release ... finalizing"); the samples are out, so skip it.
    os._exit(0)


if __name__ == "__main__":
    if "--sdk" in sys.argv:
        # This file's directory comes first on sys.path, and this file is named e2b.py:
        # drop it, or `import e2b` would find this file instead of the SDK.
        here = Path(__file__).resolve().parent
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        driver()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from engine import run_cli

        run_cli(__doc__, main)
