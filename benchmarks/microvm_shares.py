"""microVM host directories over virtio-fs: what the `host` template and a volume cost.

    uv run python benchmarks/microvm_shares.py --json [--runs N]

Per run: a cold `create` to the result of `true` of a `host` template sandbox (its /usr
over virtio-fs) beside one of a Debian layer template (the tests' offline base with
python3; its root an ext4 image), and of the layer template with a volume; `python3 -c
pass` in each (the interpreter's files read over virtio-fs or from the image). Then, in
the VM with a volume: writing and reading 64 MiB (dd, 1 MiB blocks, fsync, the page
cache dropped before the read) on the volume and on the sandbox's own disk, 1000 small
files created on each, and the resident memory of its virtiofsd. 512 MiB, 1 CPU. Prints
one JSON object; times in milliseconds, throughputs in MiB/s. Needs root, QEMU and
`make setup`'s guest kernel (.cache/guest-kernel).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import percentiles

from corral.config import Settings
from corral.images import LayerStore
from corral.isolation import Engine, Sandbox
from corral.isolation.microvm_shares import VIRTIOFSD
from corral.isolation.volumes import VolumeMount, create_image
from corral.limits import Limits
from tests.kit.debian import base_layer

KERNELS = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel"
LIMITS = Limits(memory_mib=512, cpu=1, disk_mib=512)
IO = (
    "cd {dir} && s=$(date +%s%N) && dd if=/dev/zero of=f bs=1M count=64 conv=fsync 2>/dev/null"
    " && w=$(date +%s%N) && sync && echo 3 > /proc/sys/vm/drop_caches"
    " && r0=$(date +%s%N) && dd if=f of=/dev/null bs=1M 2>/dev/null && r=$(date +%s%N)"
    " && mkdir m && m0=$(date +%s%N) && for i in $(seq 1000); do : > m/$i; done"
    " && m=$(date +%s%N) && rm -rf f m && echo $((w-s)) $((r-r0)) $((m-m0))"
)


async def _timed(box: Sandbox, argv: list[str]) -> float:
    start = time.perf_counter()
    assert (await box.run(argv)).ok
    return (time.perf_counter() - start) * 1000


def _daemon_rss_kib(sandbox_id: str) -> int:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/exe") != VIRTIOFSD:
                continue
            if sandbox_id not in Path(f"/proc/{pid}/cgroup").read_text():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


async def main(runs: int) -> dict[str, object]:
    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    os.chmod(scratch, 0o755)
    settings = Settings(
        data_dir=scratch / "data",
        runtime_dir=scratch / "run",
        cgroup_parent="corral-bench",
        guest_kernel_dir=str(KERNELS),
    )
    store = LayerStore(settings.data_dir / "templates")
    engine = Engine(settings)
    engine.templates.add("debian", store, [base_layer(store, ["python3"]).digest])
    volume = settings.data_dir / "volumes" / "bench.img"
    create_image(volume, 1 << 30)
    mounts = [VolumeMount("bench", volume, "/data")]
    cases = {"host": ("host", ()), "debian": ("debian", ()), "debian+volume": ("debian", mounts)}
    report: dict[str, object] = {"runs": runs, "load_1min_before": os.getloadavg()[0]}
    try:
        for template, volumes in cases.values():  # images made before the first timing
            await (await engine.create(template, isolation="microvm", volumes=volumes)).destroy()
        io: dict[str, list[list[float]]] = {"volume": [], "disk": []}
        rss = []
        for name, (template, volumes) in cases.items():
            boot, python = [], []
            for _ in range(runs):
                start = time.perf_counter()
                box = await engine.create(
                    template, isolation="microvm", limits=LIMITS, volumes=volumes
                )
                boot.append(await _timed(box, ["true"]) + (time.perf_counter() - start) * 1000)
                python.append(await _timed(box, ["python3", "-c", "pass"]))
                if volumes:
                    for place, directory in (("volume", "/data"), ("disk", "/tmp")):
                        done = await box.run(["sh", "-c", IO.format(dir=directory)], user="root")
                        assert done.ok, done.stderr
                        io[place].append([int(n) / 1e6 for n in done.stdout.split()])
                    rss.append(_daemon_rss_kib(box.id))
                await box.destroy()
            report[name] = {
                "create_to_first_output_ms": percentiles(boot, 50, 90),
                "python3_pass_ms": percentiles(python, 50, 90),
            }
        for place, samples in io.items():
            report[f"{place}_64MiB"] = {
                "write_MiBps": percentiles([64_000 / s[0] for s in samples], 50),
                "read_MiBps": percentiles([64_000 / s[1] for s in samples], 50),
                "create_1000_files_ms": percentiles([s[2] for s in samples], 50),
            }
        report["virtiofsd_rss_kib"] = sorted(rss)[len(rss) // 2]
    finally:
        await engine.aclose()
        shutil.rmtree(scratch, ignore_errors=True)
    report["load_1min_after"] = os.getloadavg()[0]
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    print(json.dumps(asyncio.run(main(options.runs)), indent=None if options.json else 2))
