"""Engine benchmark: sandbox start-up, warm exec round trip and idle cost, beside raw bwrap.

    uv run python benchmarks/engine.py --json

Prints one JSON object. Every figure is measured in this run on this machine; latencies
are in milliseconds, memory in KiB. Targets (2 cores): warm exec p50 <= 2 ms,
create-to-first-output p50 <= 60 ms, idle cost <= 12 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from common import print_report

from corral.config import Settings
from corral.isolation import Engine, Sandbox
from corral.isolation.seccomp import filter_fd


def percentiles(samples: list[float], *points: int) -> dict[str, float]:
    ordered = sorted(samples)
    out = {}
    for p in points:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        out[f"p{p}"] = round(ordered[index], 2)
    return out


async def create_to_first_output(engine: Engine) -> float:
    """From the create call to the result of `true` inside the new sandbox (ms)."""
    start = time.perf_counter()
    sandbox = await engine.create(isolation="namespace")
    result = await sandbox.run(["true"])
    elapsed = (time.perf_counter() - start) * 1000
    assert result.ok, result
    await sandbox.destroy()
    return elapsed


async def sequential(engine: Engine, count: int) -> list[float]:
    return [await create_to_first_output(engine) for _ in range(count)]


async def burst(engine: Engine, count: int) -> list[float]:
    return list(await asyncio.gather(*(create_to_first_output(engine) for _ in range(count))))


async def exec_roundtrips(sandbox: Sandbox, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await (await sandbox.exec(["true"])).wait()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def raw_bwrap(count: int) -> list[float]:
    """A bare `bwrap … /bin/true` with the same namespaces and seccomp, no agent."""
    argv = [
        shutil.which("bwrap") or "bwrap",
        "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
        "--unshare-uts", "--unshare-cgroup", "--disable-userns", "--die-with-parent",
        "--new-session", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--proc", "/proc", "--dev", "/dev",
    ]  # fmt: skip
    samples = []
    for _ in range(count):
        fd = filter_fd()
        start = time.perf_counter()
        subprocess.run([*argv, "--seccomp", str(fd), "/bin/true"], pass_fds=(fd,), check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def idle_cost(sandbox: Sandbox) -> dict[str, int]:
    """Host memory of an idle sandbox: RSS and PSS of all its processes, cgroup charge."""
    assert sandbox._cgroup is not None
    rss = pss = 0
    for pid in sandbox._cgroup.pids():
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup[1:] if "kB" in line}
        rss += fields.get("Rss", 0)
        pss += fields.get("Pss", 0)
    return {
        "idle_sandbox_rss_kib": rss,
        "idle_sandbox_pss_kib": pss,
        "idle_sandbox_cgroup_kib": sandbox.usage().memory_bytes // 1024,
    }


async def main(quick: bool) -> dict[str, Any]:
    runtime = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    # The burst's 50 sandboxes of 512 MiB pass a small host's capacity; each runs `true`
    # and uses a few MiB, so the bench may promise more memory than the host has.
    settings = Settings(runtime_dir=runtime, cgroup_parent="corral-bench", memory_overcommit=8)
    report: dict[str, object] = {}
    try:
        async with Engine(settings) as engine:
            await create_to_first_output(engine)  # warm caches (agent install, probes)
            seq = await sequential(engine, 20 if quick else 100)
            bur = await burst(engine, 10 if quick else 50)
            sandbox = await engine.create(isolation="namespace")
            await exec_roundtrips(sandbox, 50)  # warm up
            rt = await exec_roundtrips(sandbox, 200 if quick else 1000)
            await asyncio.sleep(0.5)
            report.update(idle_cost(sandbox))
            await sandbox.destroy()
        raw = raw_bwrap(20 if quick else 50)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    seq_p = percentiles(seq, 50, 95, 99)
    report = {
        "create_to_first_output_ms": {**seq_p, "n": len(seq)},
        "create_to_first_output_burst_ms": {**percentiles(bur, 50, 95, 99), "n": len(bur)},
        "exec_roundtrip_ms": {**percentiles(rt, 50, 99), "n": len(rt)},
        "raw_bwrap_ms": {**percentiles(raw, 50), "n": len(raw)},
        "create_vs_raw_bwrap_ratio": round(seq_p["p50"] / statistics.median(raw), 2),
        **report,
    }
    return report


Report = dict[str, Any]


def run_cli(doc: str, main: Callable[[bool], Report | Coroutine[Any, Any, Report]]) -> None:
    """A benchmark's command line: --json prints one JSON object, --quick samples less."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer samples, for smoke tests")
    args = parser.parse_args()
    started = time.perf_counter()
    outcome = main(args.quick)
    result = outcome if isinstance(outcome, dict) else asyncio.run(outcome)
    result["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    print_report(result, args.json)


if __name__ == "__main__":
    run_cli(__doc__, main)
