"""Snapshots: how long a sandbox of the Debian base is frozen while 100 MB it wrote become
a layer, how big that layer is, and what flattening it with the base costs.

    uv run python benchmarks/snapshots.py --json      # as root, after `make setup`

Bootstraps the Debian base (apt + python3) offline as benchmarks/templates.py does, starts
a sandbox of it that writes 100 MB (one file of random bytes, or 1000 files of 100 KB),
then times `Sandbox.snapshot` (freeze, read the upper dir as a tar, unpack and digest it
into the store, thaw: the sandbox is frozen for all of it), removing the layer between
runs so each run stores it anew; then `flatten` of base + snapshot. The raw baseline,
measured in the same run: `tar -cf - upper | tar -xf -` of the same upper dir (a copy
with no checks and no digest).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import percentiles, run_cli
from templates import ARCHIVE, suite

from corral.config import Settings
from corral.images import LayerStore, flatten
from corral.images.debian import bootstrap
from corral.isolation import Engine
from corral.isolation.rootfs import upper_dir
from corral.limits import Limits

MIB = 1 << 20
WRITES = {
    "one_file": "head -c 104857600 /dev/urandom > /workspace/big",
    "1000_files": "mkdir /workspace/many && for i in $(seq 1000); do "
    "head -c 104857 /dev/urandom > /workspace/many/$i; done",
}


def _du(path: Path) -> int:
    done = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def _raw_copy_ms(upper: Path, scratch: Path) -> float:
    target = scratch / "raw-copy"
    target.mkdir()
    start = time.perf_counter()
    subprocess.run(f"tar -C {upper} -cf - . | tar -C {target} -xf -", shell=True, check=True)
    elapsed = (time.perf_counter() - start) * 1000
    shutil.rmtree(target)
    return elapsed


async def main(quick: bool) -> dict[str, Any]:
    if os.geteuid() != 0 or not (ARCHIVE / "Release").is_file():
        raise SystemExit("run as root after `make setup` (it makes the local Debian archive)")
    scratch = Path(tempfile.mkdtemp(prefix="corral-snapshots-"))
    scratch.chmod(0o711)  # the sandboxes' uids traverse it to their files
    report: dict[str, Any] = {"load_1min_before": os.getloadavg()[0]}
    runs = 2 if quick else 5
    try:
        rootfs = scratch / "rootfs"
        mirror = f"deb [trusted=yes] copy://{ARCHIVE} ./"
        bootstrap(suite(), rootfs, mirror=mirror, include=["python3"])
        store = LayerStore(scratch / "data" / "templates")
        base = store.import_dir(rootfs)
        shutil.rmtree(rootfs)
        settings = Settings(
            data_dir=scratch / "data", runtime_dir=scratch / "run", cgroup_parent="corral-bench"
        )
        async with Engine(settings) as engine:
            engine.templates.add("debian", store, [base.digest])
            for case, script in WRITES.items():
                box = await engine.create(
                    template="debian", isolation="namespace", limits=Limits(disk_mib=512)
                )
                try:
                    ran = await box.run(["sh", "-c", script], timeout=300)
                    assert ran.exit_code == 0, ran.stderr
                    frozen: list[float] = []
                    raw: list[float] = []
                    for run in range(runs):
                        start = time.perf_counter()
                        digests = await box.snapshot(store)
                        frozen.append((time.perf_counter() - start) * 1000)
                        raw.append(_raw_copy_ms(upper_dir(box.footprint), scratch))
                        layer = store.get(digests[-1])
                        if run != runs - 1:
                            store.remove(layer.digest)
                    start = time.perf_counter()
                    flat = flatten(store, digests)
                    flatten_ms = (time.perf_counter() - start) * 1000
                finally:
                    await box.destroy()
                report[case] = {
                    "snapshot_ms (sandbox frozen throughout)": {
                        **percentiles(frozen, 50, 90),
                        "n": runs,
                    },
                    "raw_tar_copy_of_upper_ms": {**percentiles(raw, 50, 90), "n": runs},
                    "layer_file_bytes": layer.size_bytes,
                    "layer_disk_bytes": _du(layer.path),
                    "layer_entries": layer.entries,
                    "flatten_with_base_ms": round(flatten_ms, 1),
                    "flat_layer_file_bytes": flat.size_bytes,
                }
                store.remove(flat.digest)
                store.remove(layer.digest)
        report["base_layer_file_bytes"] = base.size_bytes
        report["load_1min_after"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
