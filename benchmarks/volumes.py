"""Named volumes: what one costs to make and what it adds to a sandbox's start.

    uv run python benchmarks/volumes.py --json      # as root

In a scratch runtime and data dir: mkfs of a volume image (and what it takes on the host's
disk), then an engine's create -> first command output -> destroy of a `host`-template
namespace sandbox without a volume (the baseline, measured in the same run), with one
volume (its loop device configured and its file system mounted by this sandbox), and with
one volume that another sandbox holds mounted (the loop device found, the file system
shared). Runs alternate between the cases so load drifts hit each alike. Reports medians
and the 1-minute load average around it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import print_report

from corral.config import Settings
from corral.isolation import Engine
from corral.isolation.volumes import VolumeMount, create_image, delete_image, used_bytes


def scratch_settings(scratch: Path) -> Settings:
    # The other benchmarks' cgroup parent: no new one left behind.
    return Settings(
        runtime_dir=scratch / "run", data_dir=scratch / "data", cgroup_parent="corral-bench"
    )


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered), 3),
        "p90_ms": round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 3),
        "runs": len(ordered),
    }


async def start_to_output(engine: Engine, volumes: list[VolumeMount]) -> float:
    start = time.perf_counter()
    box = await engine.create(isolation="namespace", volumes=volumes)
    try:
        ran = await box.run(["true"])
        elapsed = (time.perf_counter() - start) * 1000
        assert ran.exit_code == 0, ran.stderr
    finally:
        await box.destroy()
    return elapsed


async def bench(scratch: Path, runs: int) -> dict[str, Any]:
    report: dict[str, Any] = {"load_1min_before": os.getloadavg()[0]}
    settings = scratch_settings(scratch)
    mkfs: list[float] = []
    for i in range(5):
        image = scratch / f"size-{i}.img"
        start = time.perf_counter()
        create_image(image, 4096 << 20)
        mkfs.append((time.perf_counter() - start) * 1000)
        report["host_disk_of_a_new_4gib_volume_kib"] = used_bytes(image) >> 10
        delete_image(image)
    report["mkfs_4gib"] = summary(mkfs)
    lone, shared = scratch / "lone.img", scratch / "shared.img"
    create_image(lone, 256 << 20)
    create_image(shared, 256 << 20)
    samples: dict[str, list[float]] = {"no_volume": [], "one_volume": [], "volume_in_use": []}
    async with Engine(settings) as engine:
        holder = await engine.create(
            isolation="namespace", volumes=[VolumeMount("s", shared, "/data")]
        )
        try:
            cases = {
                "no_volume": [],
                "one_volume": [VolumeMount("l", lone, "/data")],
                "volume_in_use": [VolumeMount("s", shared, "/data")],
            }
            for _ in range(runs):
                for name, volumes in cases.items():
                    samples[name].append(await start_to_output(engine, volumes))
        finally:
            await holder.destroy()
    for name, values in samples.items():
        report[f"create_to_output_{name}"] = summary(values)
    report["load_1min_after"] = os.getloadavg()[0]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on one line")
    parser.add_argument("--runs", type=int, default=20, help="sandboxes per case")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("volumes need root (loop mounts): run as root")
    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-vol-"))
    scratch.chmod(0o755)  # the sandboxes' uids traverse it to their binds
    try:
        print_report(asyncio.run(bench(scratch, args.runs)), args.json)
    finally:
        Engine(scratch_settings(scratch))  # reaps what a crash left
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
