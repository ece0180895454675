"""Layer templates: create → first output of a sandbox of the Debian base vs `host`, idle cost.

    uv run python benchmarks/templates.py --json      # as root, after `make setup`

Bootstraps a Debian base (apt + python3) offline from the local archive (.cache/debian, or
CORRAL_TEST_DEBIAN_ARCHIVE) inside `unshare --net`, imports it as one layer, registers it
as a template, then times, alternating the two so the load hits both alike, the create
call to the result of `true` in the new sandbox for `host` and for the layer template
(its disk: a spare sparse ext4 mounted ahead, its layer idmapped with the sandbox's id
range, the template's accounts layer after the first, its overlay). Issue 13's target:
the ratio ≤ 1.2. Also the idle memory of a layer-template sandbox and the load average.
The machine's load moves the ratio by ±0.15 from run to run: compare medians of runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import idle_cost, percentiles, run_cli

from corral.config import Settings
from corral.images import LayerStore
from corral.images.debian import bootstrap
from corral.isolation import Engine

ARCHIVE = Path(
    os.environ.get("CORRAL_TEST_DEBIAN_ARCHIVE")
    or Path(__file__).resolve().parent.parent / ".cache" / "debian"
)


def suite() -> str:
    for line in (ARCHIVE / "Release").read_text().splitlines():
        if line.startswith("Codename:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit(f"{ARCHIVE}/Release names no codename")


async def first_output(engine: Engine, template: str) -> float:
    start = time.perf_counter()
    sandbox = await engine.create(template=template, isolation="namespace")
    result = await sandbox.run(["true"])
    elapsed = (time.perf_counter() - start) * 1000
    assert result.ok, result
    await sandbox.destroy()
    return elapsed


async def main(quick: bool) -> dict[str, Any]:
    if os.geteuid() != 0 or not (ARCHIVE / "Release").is_file():
        raise SystemExit("run as root after `make setup` (it makes the local Debian archive)")
    scratch = Path(tempfile.mkdtemp(prefix="corral-templates-"))
    scratch.chmod(0o711)  # the sandboxes' uids traverse it to their files
    report: dict[str, Any] = {"load_1min_before": os.getloadavg()[0]}
    try:
        rootfs = scratch / "rootfs"
        mirror = f"deb [trusted=yes] copy://{ARCHIVE} ./"
        bootstrap(suite(), rootfs, mirror=mirror, include=["python3"])
        store = LayerStore(scratch / "data" / "templates")
        layer = store.import_dir(rootfs)
        shutil.rmtree(rootfs)
        settings = Settings(
            data_dir=scratch / "data", runtime_dir=scratch / "run", cgroup_parent="corral-bench"
        )
        runs = 10 if quick else 40
        async with Engine(settings) as engine:
            engine.templates.add("debian", store, [layer.digest])
            host: list[float] = []
            debian: list[float] = []
            for name in ("host", "debian"):  # warm caches (agent install, probes)
                await first_output(engine, name)
            for _ in range(runs):
                host.append(await first_output(engine, "host"))
                debian.append(await first_output(engine, "debian"))
            sandbox = await engine.create(template="debian", isolation="namespace")
            await sandbox.run(["true"])
            await asyncio.sleep(0.5)
            idle = idle_cost(sandbox)
            await sandbox.destroy()
        ratio = statistics.median(debian) / statistics.median(host)
        report.update(
            {
                "create_to_first_output_host_ms": {**percentiles(host, 50, 90), "n": runs},
                "create_to_first_output_debian_ms": {**percentiles(debian, 50, 90), "n": runs},
                "debian_vs_host_ratio": round(ratio, 2),
                "target_ratio": 1.2,
                "layer_bytes": layer.size_bytes,
                **idle,
                "load_1min_after": os.getloadavg()[0],
            }
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
