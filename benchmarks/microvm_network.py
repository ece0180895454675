"""microVM network benchmark: what a network costs a microVM sandbox's start, and its speed.

    sudo uv run python benchmarks/microvm_network.py --json [--rounds N]

Root only; runs inside the tests' fake internet (tests/kit/internet.py), like
benchmarks/network.py: the engine runs in the fake internet's gateway namespace, so no
packet leaves the machine. Per round, interleaved: a sandbox of the Debian layer template
(the tests' offline base with python3) with network `none`, then one with `internet`,
each from `create` to the result of `true` (`start_ms`; what the network adds is the
difference of the p50s). Then, from one `internet` guest: one HTTP GET on a new
connection to the fake `allowed.test` by address (`first_get_ms`) and a 100 MB download
(`download_mb_s`, median of 3). Images are made before the first round. Prints one JSON
object (ms, p50/p95) with the 1-minute load average before and after. Needs QEMU and
`make setup`'s guest kernel (.cache/guest-kernel).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' kit

from engine import percentiles
from network_paths import DOWNLOAD, DOWNLOAD_BYTES, GET

from tests.kit import internet as fake

KERNELS = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel"


async def inside(runtime_dir: str, rounds: int) -> dict[str, Any]:
    """The engine's side, run in the gateway namespace."""
    from corral.config import Settings
    from corral.images import LayerStore
    from corral.isolation import Engine
    from corral.limits import Limits
    from tests.kit.debian import base_layer

    settings = Settings(
        runtime_dir=Path(runtime_dir),
        data_dir=Path(runtime_dir) / "data",
        cgroup_parent="corral-bench",
        network_dns=f"{fake.DNS_V4},{fake.DNS_V6}",
        guest_kernel_dir=str(KERNELS),
    )
    limits = Limits(memory_mib=256)
    start: dict[str, list[float]] = {"none": [], "internet": []}
    async with Engine(settings) as engine:
        store = LayerStore(settings.data_dir / "templates")
        engine.templates.add("debian", store, [base_layer(store, ["python3"]).digest])
        warm = await engine.create("debian", isolation="microvm", limits=limits)  # images
        await warm.destroy()
        for _ in range(rounds):
            for network in start:
                began = time.perf_counter()
                box = await engine.create(
                    "debian", isolation="microvm", limits=limits, network=network
                )
                await box.run(["true"])
                start[network].append((time.perf_counter() - began) * 1000)
                await box.destroy()
        box = await engine.create("debian", isolation="microvm", limits=limits, network="internet")

        async def python(code: str) -> float:
            return float((await box.run(["python3", "-c", code], timeout=300)).stdout)

        try:
            gets = [await python(GET.format(host=fake.ALLOWED_V4)) for _ in range(rounds)]
            download = DOWNLOAD.format(host=fake.ALLOWED_V4, size=DOWNLOAD_BYTES)
            rates = [await python(download) for _ in range(3)]
        finally:
            await box.destroy()
    starts = {name: percentiles(took, 50, 95) for name, took in start.items()}
    return {
        "start_ms": starts,
        "start_added_p50_ms": round(starts["internet"]["p50"] - starts["none"]["p50"], 1),
        "first_get_ms": percentiles(gets, 50, 95),
        "download_mb_s": round(statistics.median(rates)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # the engine's side
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(asyncio.run(inside(args.inside, args.rounds))))
        return
    if reason := fake.unavailable():
        sys.exit(f"microvm_network: {reason}")
    result: dict[str, Any] = {"rounds": args.rounds, "load_before": os.getloadavg()[0]}
    net = fake.build()
    runtime = tempfile.mkdtemp(prefix="corral-bench-")
    try:
        engine = [sys.executable, __file__, "--rounds", str(args.rounds), "--inside", runtime]
        argv = ["nsenter", f"--net=/run/netns/{net.netns(fake.GATEWAY)}", "--", *engine]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"microvm_network: the engine's side failed: {done.stderr.strip()}")
        result.update(json.loads(done.stdout))
    finally:
        net.close()
        shutil.rmtree(runtime, ignore_errors=True)
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
