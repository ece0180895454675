"""Isolation tiers side by side: start-up, exec, idle memory, file throughput and restore
from a memory snapshot per tier, beside each tier's raw baseline.

    uv run python benchmarks/tiers.py --json      # as root, after `make setup`

Prints one JSON object. For every tier this host offers (namespace, gvisor, microvm; a
tier it lacks is reported with its probe's reason): create -> first output (`echo` in a
new sandbox) cold, and from a warm pool (a SandboxManager whose default tier it is, one
spare, refilled between samples); the exec round trip of `true`; the host memory an idle
sandbox holds (its cgroup's charge, and RSS/PSS of its processes); writing then reading
100 MiB through the agent; and, on a tier with memory snapshots, checkpoint and restore
to a first output. The raw baselines, measured in the same run: `runsc do true` (the
platform the gvisor tier picked, --network=none) and a bare QEMU boot of the microvm
tier's kernel and init to the first line of output. Latencies in ms (medians and p90),
throughput in MiB/s; the load average before and after says how busy the host was.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine import idle_cost, percentiles, run_cli
from templates import ARCHIVE, suite

from corral.config import Settings
from corral.images import Layer, LayerStore
from corral.images.debian import bootstrap
from corral.isolation import Engine, Sandbox
from corral.isolation.registry import backend_class, unavailable
from corral.sandboxes import CreateOptions, SandboxManager
from corral.store import Store

TIERS = ("namespace", "gvisor", "microvm")
# Samples per tier (full run, --quick): microvm boots under TCG on hosts without KVM.
SAMPLES = {"namespace": (30, 5), "gvisor": (15, 5), "microvm": (5, 2)}
MIB = 1 << 20
# A layer template's store and layer (the Debian base), for a tier without `host`.
Base = tuple[LayerStore, Layer]
FILE_MIB = 100
GUEST_KERNELS = Path(__file__).resolve().parents[1] / ".cache" / "guest-kernel"


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def summary(samples: list[float]) -> dict[str, float]:
    return {**percentiles(samples, 50, 90), "n": len(samples)}


async def first_output(engine: Engine, tier: str, template: str, **create: Any) -> float:
    """From the create call to the output of `echo` in the new sandbox (ms)."""
    start = time.perf_counter()
    sandbox = await engine.create(template, isolation=tier, **create)
    result = await sandbox.run(["echo", "first"])
    elapsed = ms_since(start)
    assert result.stdout == b"first\n", result
    await sandbox.destroy()
    return elapsed


async def exec_roundtrips(sandbox: Sandbox, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await (await sandbox.exec(["true"])).wait()
        samples.append(ms_since(start))
    return samples


async def file_throughput(sandbox: Sandbox) -> dict[str, float]:
    """MiB/s writing then reading FILE_MIB MiB through the guest agent."""
    block = os.urandom(MIB)

    def blocks() -> Iterator[bytes]:
        for _ in range(FILE_MIB):
            yield block

    start = time.perf_counter()
    entry = await sandbox.write_file("/tmp/bench.bin", blocks())
    write_s = time.perf_counter() - start
    assert entry.size == FILE_MIB * MIB
    start = time.perf_counter()
    read = 0
    async for chunk in sandbox.read_file("/tmp/bench.bin"):
        read += len(chunk)
    read_s = time.perf_counter() - start
    assert read == FILE_MIB * MIB
    await sandbox.remove("/tmp/bench.bin")
    return {
        "write_mib_s": round(FILE_MIB / write_s, 1),
        "read_mib_s": round(FILE_MIB / read_s, 1),
    }


async def snapshot_times(
    engine: Engine, tier: str, template: str, runs: int, scratch: Path
) -> dict[str, Any]:
    """Checkpoint of a sandbox with a process running, and restore to a first output."""
    checkpoint: list[float] = []
    restore: list[float] = []
    for i in range(runs):
        box = await engine.create(template, isolation=tier)
        await box.exec(["sleep", "600"], background=True)
        image = scratch / f"checkpoint-{tier}-{i}"
        start = time.perf_counter()
        await box.checkpoint(image)
        checkpoint.append(ms_since(start))
        restore.append(await first_output(engine, tier, template, restore=image))
        shutil.rmtree(image, ignore_errors=True)
    return {"checkpoint_ms": summary(checkpoint), "restore_to_first_output_ms": summary(restore)}


async def warm_pool_first_output(
    settings: Settings, tier: str, layer: Base | None, runs: int
) -> list[float]:
    """create -> first output through a SandboxManager whose default tier is `tier`, with a
    spare ready each time (its pool refills between samples): of `host`, or of the layer
    template `debian` (`layer`: a pool made at its first create, as the server's `base`)."""
    store = Store.open(settings)
    manager = SandboxManager(settings.with_(default_isolation=tier), store, pool_size=1, tick=0.1)
    template = "host"
    if layer is not None:
        template = "debian"
        manager.engine.templates.add(template, layer[0], [layer[1].digest])
        manager.poolable = lambda name: name == "debian"
        manager.resolve_template = lambda team_id, name: name
    samples: list[float] = []
    try:
        await manager.start()
        team = store.create_team(f"bench-{tier}")
        options = CreateOptions(template=template, isolation=tier)
        if layer is not None:  # its pool starts at the first create of the template
            await manager.kill(team, (await manager.create(team, options)).id)
        pool = next(p for p in manager.pools if (p.isolation, p.template) == (tier, template))
        for _ in range(runs):
            await until(lambda: pool.ready == 1, timeout=600)
            start = time.perf_counter()
            record = await manager.create(team, options)
            box = await manager.running(team, record.id)
            result = await box.run(["echo", "first"])
            samples.append(ms_since(start))
            assert result.stdout == b"first\n" and record.state_reason.endswith("warm pool")
            await manager.kill(team, record.id)
    finally:
        await manager.aclose()
        store.close()
    return samples


async def until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"the warm pool did not fill in {timeout} s")
        await asyncio.sleep(0.05)


async def bench_tier(
    settings: Settings, tier: str, quick: bool, scratch: Path, layer: Base | None
) -> dict[str, Any]:
    """The tier's figures, of `host` sandboxes, or of the Debian base (`layer`)."""
    runs = SAMPLES[tier][1 if quick else 0]
    report: dict[str, Any] = {"template": "host" if layer is None else "debian (python3)"}
    async with Engine(settings) as engine:
        template = "host"
        if layer is not None:
            template = "debian"
            engine.templates.add(template, layer[0], [layer[1].digest])
        await first_output(engine, tier, template)  # caches: the agent, probes, images
        cold = [await first_output(engine, tier, template) for _ in range(runs)]
        report["create_to_first_output_cold_ms"] = summary(cold)
        box = await engine.create(template, isolation=tier)
        try:
            await exec_roundtrips(box, 20)
            report["exec_roundtrip_ms"] = summary(await exec_roundtrips(box, runs * 20))
            await asyncio.sleep(1)  # idle: what it holds between commands
            report.update(idle_cost(box))
            report["file_100mib"] = await file_throughput(box)
        finally:
            await box.destroy()
        if engine.backend(tier).memory_snapshots:
            report.update(await snapshot_times(engine, tier, template, max(2, runs // 3), scratch))
            ratio = (
                report["restore_to_first_output_ms"]["p50"]
                / report["create_to_first_output_cold_ms"]["p50"]
            )
            report["restore_vs_cold_ratio"] = round(ratio, 2)
        else:
            report["restore_to_first_output_ms"] = f"the {tier} tier has no memory snapshots"
    warm = await warm_pool_first_output(settings, tier, layer, runs)
    report["create_to_first_output_warm_ms"] = summary(warm)
    return report


def debian_base(settings: Settings) -> Base:
    """The Debian base with python3, bootstrapped offline from the local archive (`make
    setup`) into the run's layer store: the template of a tier without `host`."""
    if os.geteuid() != 0 or not (ARCHIVE / "Release").is_file():
        raise SystemExit("run as root after `make setup` (it makes the local Debian archive)")
    rootfs = settings.data_dir / "debian-rootfs"
    bootstrap(suite(), rootfs, mirror=f"deb [trusted=yes] copy://{ARCHIVE} ./", include=["python3"])
    store = LayerStore(settings.data_dir / "templates")
    layer = store.import_dir(rootfs)
    shutil.rmtree(rootfs)
    return store, layer


def timed_runs(argv: list[str], runs: int, **options: Any) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=120, **options)
        samples.append(ms_since(start))
    return samples


def runsc_baseline(settings: Settings, runs: int, scratch: Path) -> dict[str, Any]:
    """`runsc do true` on the platform the gvisor tier uses, no network."""
    from corral.isolation.gvisor import find_runsc

    runsc = find_runsc(settings.gvisor_platform)
    assert runsc is not None and runsc.platform is not None
    argv = [runsc.path, "--root", str(scratch / "runsc"), f"--platform={runsc.platform}"]
    argv += ["--network=none", *(["--rootless"] if os.geteuid() else []), "do", "true"]
    timed_runs(argv, 1, cwd="/")  # warm the page cache
    return {"platform": runsc.platform, **summary(timed_runs(argv, runs, cwd="/"))}


def qemu_baseline(settings: Settings, runs: int, scratch: Path) -> dict[str, Any]:
    """A bare QEMU boot of the microvm tier's kernel and init, its machine and accelerator
    (`microvm.bare_boot_argv`), to the init's first line of output."""
    from corral.isolation.microvm import BARE_BOOT_LINE, bare_boot_argv

    argv = bare_boot_argv(settings)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as qemu:
            assert qemu.stdout is not None
            try:
                for line in qemu.stdout:
                    if BARE_BOOT_LINE.encode() in line:
                        samples.append(ms_since(start))
                        break
                else:
                    raise SystemExit("QEMU ended before its init printed a line")
            finally:
                qemu.kill()
    return {"accel": "tcg" if "tcg" in " ".join(argv) else "kvm", **summary(samples)}


BASELINES: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "gvisor": ("raw_runsc_do_true_ms", runsc_baseline),
    "microvm": ("raw_qemu_boot_to_first_line_ms", qemu_baseline),
}


async def main(quick: bool) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    # The guest kernel: CORRAL_GUEST_KERNEL_DIR, else where `make setup` downloads it.
    kernels = os.environ.get("CORRAL_GUEST_KERNEL_DIR") or str(GUEST_KERNELS)
    settings = Settings(
        data_dir=scratch / "data",
        runtime_dir=scratch,
        cgroup_parent="corral-bench",
        base_template="off",
        guest_kernel_dir=kernels,
    )
    report: dict[str, Any] = {"cores": os.cpu_count(), "load_1min_before": os.getloadavg()[0]}
    try:
        for tier in TIERS:
            if reason := unavailable(tier, settings):
                report[tier] = {"unavailable": reason}
                continue
            # microvm: the Debian base, as before its `host` template existed (its memory
            # snapshots need a layer template: QEMU cannot migrate virtio-fs).
            on_host = backend_class(tier).host_template and tier != "microvm"
            layer = None if on_host else debian_base(settings)
            figures = await bench_tier(settings, tier, quick, scratch, layer)
            if tier in BASELINES:
                key, baseline = BASELINES[tier]
                runs = SAMPLES[tier][1 if quick else 0]
                figures[key] = await asyncio.to_thread(baseline, settings, runs, scratch)
                ratio = figures["create_to_first_output_cold_ms"]["p50"] / figures[key]["p50"]
                figures["cold_vs_raw_ratio"] = round(ratio, 2)
            report[tier] = figures
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["load_1min_after"] = os.getloadavg()[0]
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
