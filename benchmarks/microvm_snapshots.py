"""microVM memory snapshots: checkpoint and restore beside a cold boot, measured together.

    uv run python benchmarks/microvm_snapshots.py --json [--runs N]

Per run, for a sandbox of a Debian layer template (the tests' offline base with python3,
256 MiB, 1 CPU): a cold `create` to the result of `true`; then `Sandbox.checkpoint` (the
agent lets go, QMP stop + migrate into the image, the disk moved beside it, QEMU gone)
and `Engine.create(restore=...)` to the result of `true`; idle, and with a process holding
100 MB of random bytes. Also the image's size on disk (memory, and the sparse disk's used
blocks). Images (template root, agent runtime, initramfs) are made before the first
run. Prints one JSON object; times in milliseconds. Target: restore faster than a cold
start. Needs root, QEMU and `make setup`'s guest kernel (.cache/guest-kernel).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import percentiles

from corral.config import Settings
from corral.images import LayerStore
from corral.isolation import Engine
from corral.limits import Limits
from tests.kit.debian import base_layer

KERNELS = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel"
# A process holding 100 MB of random bytes (guest memory that a migration must copy).
HOLD = "import os, time; b = os.urandom(100 << 20); open('/tmp/ready', 'w'); time.sleep(1e6)"
CASES = {"idle": False, "100MB_in_a_process": True}


def _du(path: Path) -> int:
    done = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[0])


async def main(runs: int) -> dict[str, object]:
    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    settings = Settings(
        data_dir=scratch / "data",
        runtime_dir=scratch / "run",
        cgroup_parent="corral-bench",
        guest_kernel_dir=str(KERNELS),
    )
    store = LayerStore(settings.data_dir / "templates")
    engine = Engine(settings)
    layer = base_layer(store, ["python3"])
    engine.templates.add("debian-root", store, [layer.digest], user="root")
    limits = Limits(memory_mib=256, cpu=1)
    report: dict[str, object] = {"runs": runs, "load_1min_before": os.getloadavg()[0]}
    try:
        warm = await engine.create("debian-root", isolation="microvm", limits=limits)  # images
        await warm.destroy()
        cold = []
        for _ in range(runs):
            start = time.perf_counter()
            box = await engine.create("debian-root", isolation="microvm", limits=limits)
            assert (await box.run(["true"])).ok
            cold.append((time.perf_counter() - start) * 1000)
            await box.destroy()
        report["cold_create_to_first_output_ms"] = percentiles(cold, 50, 90)
        for case, hold in CASES.items():
            checkpoint, restore, sizes = [], [], []
            for i in range(runs):
                box = await engine.create("debian-root", isolation="microvm", limits=limits)
                if hold:
                    await (await box.exec(["python3", "-c", HOLD], background=True)).detach()
                    while not (await box.run(["test", "-e", "/tmp/ready"])).ok:
                        await asyncio.sleep(0.05)
                image = scratch / f"{case}-{i}"
                start = time.perf_counter()
                await box.checkpoint(image)
                checkpoint.append((time.perf_counter() - start) * 1000)
                sizes.append(_du(image))
                start = time.perf_counter()
                box = await engine.create(
                    "debian-root", isolation="microvm", limits=limits, restore=image
                )
                assert (await box.run(["true"])).ok
                restore.append((time.perf_counter() - start) * 1000)
                await box.destroy()
                shutil.rmtree(image)
            report[case] = {
                "checkpoint_ms": percentiles(checkpoint, 50, 90),
                "restore_to_first_output_ms": percentiles(restore, 50, 90),
                "image_bytes": sorted(sizes)[len(sizes) // 2],
            }
    finally:
        await engine.aclose()
        shutil.rmtree(scratch, ignore_errors=True)
    report["load_1min_after"] = os.getloadavg()[0]
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    print(json.dumps(asyncio.run(main(options.runs)), indent=None if options.json else 2))
