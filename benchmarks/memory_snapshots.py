"""Memory snapshots on gVisor: checkpoint and restore of a sandbox beside its cold start.

    uv run python benchmarks/memory_snapshots.py --json      # as root, runsc installed

For an idle `host` sandbox and one holding 100 MB (a file on its /tmp, a tmpfs in the
sentry's memory): `Sandbox.checkpoint` (the agent lets go, `runsc checkpoint` writes the
image, the sandbox is destroyed), `Engine.create(restore=...)` to the result of `true`
(restore to first output), and the image's size; beside them the cold create to first
output of the same tier, and the raw `runsc do true`, measured in the same run.
Then what a memory template buys: a warmed interpreter (the host's python3 with
cryptography, yaml, pygments, OpenSSL and a few standard modules imported, then
waiting) started cold (create, start it, wait until it says it is ready) against
restored, ready, from one checkpoint into new sandboxes.
Latencies in milliseconds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import percentiles, run_cli

from corral.config import Settings
from corral.isolation import Engine, Sandbox
from corral.isolation.gvisor import find_runsc
from corral.limits import Limits

WARM = (
    "import asyncio, email.parser, http.server, json, sqlite3, decimal, ssl, tarfile, "
    "cryptography.x509, yaml, pygments.lexers, OpenSSL, jwt\n"
    "open('/tmp/ready', 'w').close()\n"
    "import time\n"
    "while True: time.sleep(60)"
)
CASES = {"idle": None, "100MB_in_tmpfs": "head -c 104857600 /dev/urandom > /tmp/big"}


async def _first_output(sandbox: Sandbox, start: float) -> float:
    result = await sandbox.run(["true"])
    assert result.ok, result
    return (time.perf_counter() - start) * 1000


def _du(path: Path) -> int:
    done = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[0])


def _raw_runsc(runsc: str, platform: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        state = tempfile.mkdtemp(prefix="corral-bench-runsc-")
        argv = [runsc, "--root", state, f"--platform={platform}", "--network=none"]
        start = time.perf_counter()
        subprocess.run([*argv, "do", "true"], check=True, cwd="/", stdin=subprocess.DEVNULL)
        samples.append((time.perf_counter() - start) * 1000)
        shutil.rmtree(state, ignore_errors=True)
    return samples


async def _start_warm(engine: Engine, limits: Limits) -> Sandbox:
    box = await engine.create(isolation="gvisor", limits=limits)
    await (await box.exec(["python3", "-c", WARM], background=True, tag="warm")).detach()
    while not (await box.run(["test", "-e", "/tmp/ready"])).ok:
        await asyncio.sleep(0.01)
    return box


async def _warmed_python(
    engine: Engine, limits: Limits, scratch: Path, runs: int
) -> dict[str, Any]:
    cold = []
    for _ in range(runs):
        start = time.perf_counter()
        box = await _start_warm(engine, limits)
        cold.append((time.perf_counter() - start) * 1000)
        await box.destroy()
    image = scratch / "warm"
    await (await _start_warm(engine, limits)).checkpoint(image)
    restored = []
    for _ in range(runs):
        start = time.perf_counter()
        box = await engine.create(isolation="gvisor", limits=limits, restore=image)
        assert (await box.run(["test", "-e", "/tmp/ready"])).ok
        restored.append((time.perf_counter() - start) * 1000)
        await box.destroy()
    return {
        "cold_to_ready_ms": {**percentiles(cold, 50), "n": runs},
        "restored_to_ready_ms": {**percentiles(restored, 50), "n": runs},
        "image_bytes": _du(image),
    }


async def main(quick: bool) -> dict[str, Any]:
    runsc = find_runsc("auto")
    if os.geteuid() != 0 or runsc is None or runsc.platform is None:
        raise SystemExit("run as root on a host where runsc works (`corral doctor`)")
    runs = 3 if quick else 10
    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    scratch.chmod(0o711)
    settings = Settings(
        data_dir=scratch / "data", runtime_dir=scratch / "run", cgroup_parent="corral-bench"
    )
    report: dict[str, Any] = {
        "load_1min_before": os.getloadavg()[0],
        "runsc": f"{runsc.version}, platform {runsc.platform}",
    }
    limits = Limits(memory_mib=512, disk_mib=256)
    try:
        async with Engine(settings) as engine:
            await (await engine.create(isolation="gvisor")).destroy()  # warm caches
            cold = []
            for _ in range(runs):
                start = time.perf_counter()
                box = await engine.create(isolation="gvisor", limits=limits)
                cold.append(await _first_output(box, start))
                await box.destroy()
            report["cold_create_to_first_output_ms"] = {**percentiles(cold, 50), "n": runs}
            for case, script in CASES.items():
                checkpoint, restore, sizes = [], [], []
                for i in range(runs):
                    box = await engine.create(isolation="gvisor", limits=limits)
                    if script:
                        assert (await box.run(["sh", "-c", script])).ok
                    image = scratch / f"{case}-{i}"
                    start = time.perf_counter()
                    await box.checkpoint(image)
                    checkpoint.append((time.perf_counter() - start) * 1000)
                    sizes.append(_du(image))
                    start = time.perf_counter()
                    box = await engine.create(
                        isolation="gvisor", limits=limits, sandbox_id=box.id, restore=image
                    )
                    restore.append(await _first_output(box, start))
                    await box.destroy()
                    shutil.rmtree(image)
                report[case] = {
                    "checkpoint_ms": {**percentiles(checkpoint, 50), "n": runs},
                    "restore_to_first_output_ms": {**percentiles(restore, 50), "n": runs},
                    "image_bytes": sorted(sizes)[len(sizes) // 2],
                }
            report["warmed_python"] = await _warmed_python(engine, limits, scratch, runs)
        raw = _raw_runsc(runsc.path, runsc.platform, runs)
        report["raw_runsc_do_true_ms"] = {**percentiles(raw, 50), "n": runs}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["load_1min_after"] = os.getloadavg()[0]
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
