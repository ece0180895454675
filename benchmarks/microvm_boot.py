"""microVM benchmark: boot to first command beside a bare QEMU boot of the same kernel.

    uv run python benchmarks/microvm_boot.py --json [--runs N]

Per run: a bare boot (`microvm.bare_boot_argv`: the tier's QEMU machine, kernel and
initramfs, whose init prints a line and stops the VM: wall time to that line) and a
sandbox of a Debian layer template (the tests' offline base with python3) from `create`
to the result of `true`, then the exec round trip and QEMU's memory beside the guest's.
Images (template root, agent runtime, initramfs) are made before the first run. Prints
one JSON object; times in milliseconds. Target: boot to first command <= 1.3x the bare
boot. Needs root, QEMU and `make setup`'s guest kernel (.cache/guest-kernel).
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
from corral.isolation.microvm import BARE_BOOT_LINE, bare_boot_argv
from corral.limits import Limits
from tests.kit.debian import base_layer

KERNELS = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel"


def bare_boot(settings: Settings) -> float:
    start = time.perf_counter()
    qemu = subprocess.Popen(bare_boot_argv(settings), stdout=subprocess.PIPE)
    assert qemu.stdout is not None
    for line in qemu.stdout:
        if BARE_BOOT_LINE.encode() in line:
            elapsed = time.perf_counter() - start
            break
    else:
        raise SystemExit("the bare boot printed no line")
    qemu.wait()
    return elapsed * 1000


def cgroup_memory(sandbox_id: str) -> int | None:
    for path in (
        f"/sys/fs/cgroup/memory/corral-bench/{sandbox_id}/memory.usage_in_bytes",
        f"/sys/fs/cgroup/corral-bench/{sandbox_id}/memory.current",
    ):
        if os.path.exists(path):
            return int(Path(path).read_text())
    return None


async def main(runs: int) -> dict[str, object]:
    runtime = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    settings = Settings(
        data_dir=runtime / "data",
        runtime_dir=runtime,
        cgroup_parent="corral-bench",
        guest_kernel_dir=str(KERNELS),
    )
    store = LayerStore(settings.data_dir / "templates")
    engine = Engine(settings)
    engine.templates.add("debian", store, [base_layer(store, ["python3"]).digest])
    limits = Limits(memory_mib=256)
    try:
        warm = await engine.create("debian", isolation="microvm", limits=limits)  # images
        await warm.destroy()
        bare, first, rtt = [], [], []
        memory: dict[str, object] = {}
        for _ in range(runs):
            bare.append(bare_boot(settings))
            start = time.perf_counter()
            box = await engine.create("debian", isolation="microvm", limits=limits)
            await box.run(["true"])
            first.append((time.perf_counter() - start) * 1000)
            for _ in range(20):
                t = time.perf_counter()
                await box.run(["true"])
                rtt.append((time.perf_counter() - t) * 1000)
            used = await box.run(["sh", "-c", "grep -E 'MemTotal|MemFree' /proc/meminfo"])
            total, free = (int(line.split()[1]) for line in used.stdout.decode().splitlines())
            memory = {
                "guest_mib": 256,
                "guest_used_mib": round((total - free) / 1024),
                "cgroup_mib": round((cgroup_memory(box.id) or 0) / 2**20),
            }
            await box.destroy()
    finally:
        await engine.aclose()
        shutil.rmtree(runtime, ignore_errors=True)
    p_bare, p_first = percentiles(bare, 50, 90), percentiles(first, 50, 90)
    return {
        "runs": runs,
        "load_average_1m": os.getloadavg()[0],
        "bare_qemu_boot_ms": p_bare,
        "boot_to_first_command_ms": p_first,
        "ratio_p50": round(p_first["p50"] / p_bare["p50"], 2),
        "exec_roundtrip_ms": percentiles(rtt, 50, 90),
        "idle_memory": memory,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    print(json.dumps(asyncio.run(main(options.runs)), indent=None if options.json else 2))
