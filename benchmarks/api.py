"""API benchmark: time to first command through the API, warm pool and cold, beside the engine.

    uv run python benchmarks/api.py --json

Time to first command (TTFC) is what the ComputeSDK benchmark measures of E2B, Daytona
and Modal: from the create call to the result of `echo hi` in the new sandbox, through
the SDK, the HTTP API and the server. Measured 100 times in sequence and as a burst of 50,
against a server with a warm pool and one without; then the warm exec round trip through
the API, and the engine's own figures (`benchmarks/engine.py`) in the same run. Prints one
JSON object; latencies in milliseconds. Targets (2 cores): warm TTFC p50 <= 15 ms and
p99 <= 50 ms, exec round trip p50 <= 5 ms.

`protocols` compares the HTTP servers and wire protocols side by side, each on a warm
server of its own, through the SDK: Connect on uvicorn (HTTP/1.1), Connect on pyvoy
(HTTP/1.1 to Envoy) and native gRPC on pyvoy (HTTP/2, the SDK's CORRAL_PROTOCOL=grpc).
The three servers run at once and are measured in alternating rounds, so that a noisy
host's load falls on each alike; `vs_connect_uvicorn` gives each p50 as a ratio of
Connect on uvicorn's, and `load` the host's load average before and after.
`databases` compares the stores the same way: warm TTFC and exec round trip on a server
whose store is SQLite, and on one whose store is PostgreSQL (a throwaway cluster of the
run's own, as the tests start: tests/kit/postgres.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.kit

from common import database, free_port, wait_answering
from engine import create_to_first_output, exec_roundtrips, percentiles, raw_bwrap, run_cli

from corral import AsyncSandbox
from corral.config import Settings
from corral.errors import CorralError
from corral.isolation import Engine
from corral.store import Store

CGROUP_PARENT = "corral-bench"
# Between sequential warm measurements: the pool's filler starts a replacement meanwhile
# (one takes ~100 ms), so each create finds a warm sandbox, as a client sending fewer than
# ~8 creates a second would. The burst shows what happens past that rate.
WARM_PACE = 0.1
# Rounds of the side-by-side protocol comparison (each protocol gets a block per round).
PROTOCOL_ROUNDS = 5
# name: (the server's CORRAL_HTTP_SERVER, the SDK's CORRAL_PROTOCOL)
PROTOCOLS = {
    "connect_uvicorn": ("uvicorn", "connect"),
    "connect_pyvoy": ("pyvoy", "connect"),
    "grpc_pyvoy": ("pyvoy", "grpc"),
}


@contextmanager
def running_server(
    root: Path,
    name: str,
    pool_size: int,
    extra_env: dict[str, str] | None = None,
    runtime_dir: Path | None = None,
    database_url: str = "",
) -> Iterator[tuple[str, str]]:
    """A `corral server` subprocess; yields (url, API key of a team with room for bursts).
    Its store is SQLite in its data dir, or the database at `database_url`."""
    data = root / name
    settings = Settings(
        data_dir=data,
        runtime_dir=runtime_dir or root / "run",
        cgroup_parent=CGROUP_PARENT,
        database_url=database_url,
    )
    store = Store.open(settings)
    try:
        # Quotas are totals: room for 500 sandboxes of the default limits.
        store.create_team(
            "bench",
            max_sandboxes=500,
            max_memory_mib=500 * 512,
            max_cpu=500,
            max_disk_mib=500 << 10,
        )
        key = store.create_api_key("bench")
    finally:
        store.close()
    port = free_port()
    env = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_RUNTIME_DIR": str(settings.runtime_dir),
        "CORRAL_CGROUP_PARENT": CGROUP_PARENT,
        "CORRAL_POOL_SIZE": str(pool_size),
        "CORRAL_LOG_LEVEL": "warning",
        # A burst of 50 sandboxes of 512 MiB passes a small host's capacity; each runs
        # `echo hi` and uses a few MiB, so the bench may promise more than the host has.
        "CORRAL_MEMORY_OVERCOMMIT": "8",
        "CORRAL_DATABASE_URL": database_url,
        **(extra_env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "server", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # pyvoy starts two Pythons in turn (corral server, then the app in Envoy)
        wait_answering(url, process, f"the {name} server", timeout=90)
        time.sleep(1.0 if pool_size else 0)  # let the pool fill
        yield url, key
    finally:
        process.terminate()
        process.wait(30)


def start(
    servers: ExitStack, root: Path, name: str, pool_size: int, env: dict[str, str]
) -> tuple[str, str]:
    """A server kept running until `servers` closes; (url, key). Tried twice: a start may
    take longer than the 30 s `running_server` allows on a loaded machine."""
    for attempt in range(2):
        try:
            return servers.enter_context(running_server(root, f"{name}{attempt}", pool_size, env))
        except SystemExit as exc:
            print(f"{exc}; trying again", file=sys.stderr)
    raise SystemExit(f"the {name} server did not start twice")


async def first_command(url: str, key: str) -> float | None:
    """ms from create to the result of `echo hi`; None if anything failed."""
    started = time.perf_counter()
    try:
        sandbox = await AsyncSandbox.create(server=url, api_key=key, timeout=60)
        try:
            result = await sandbox.commands.run("echo hi")
            elapsed = (time.perf_counter() - started) * 1000
            return elapsed if result.stdout == "hi\n" else None
        finally:
            await sandbox.kill()
            await sandbox.aclose()
    except CorralError as exc:
        print(f"ttfc failed: {exc}", file=sys.stderr)
        return None


async def ttfc(url: str, key: str, count: int, burst: int, pace: float) -> dict[str, Any]:
    sequential: list[float | None] = []
    for _ in range(count):
        sequential.append(await first_command(url, key))
        await asyncio.sleep(pace)
    if burst:
        await asyncio.sleep(1.0)  # refill before the burst
    bursted = await asyncio.gather(*(first_command(url, key) for _ in range(burst)))
    return {"sequential": sequential, "burst": list(bursted)}


async def api_roundtrips(url: str, key: str, count: int) -> list[float]:
    async with await AsyncSandbox.create(server=url, api_key=key) as sandbox:
        for _ in range(50):  # warm up
            await sandbox.commands.run(["true"])
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            await sandbox.commands.run(["true"])
            samples.append((time.perf_counter() - start) * 1000)
        return samples


async def engine_figures(root: Path, quick: bool) -> dict[str, Any]:
    settings = Settings(runtime_dir=root / "engine", cgroup_parent=CGROUP_PARENT)
    async with Engine(settings) as engine:
        await create_to_first_output(engine)
        created = [await create_to_first_output(engine) for _ in range(10 if quick else 30)]
        sandbox = await engine.create(isolation="namespace")
        await exec_roundtrips(sandbox, 50)
        rt = await exec_roundtrips(sandbox, 200 if quick else 500)
        await sandbox.destroy()
    raw = raw_bwrap(10 if quick else 30)
    return {
        "engine_create_to_first_output_ms": {**percentiles(created, 50, 95, 99), "n": len(created)},
        "engine_exec_roundtrip_ms": {**percentiles(rt, 50, 99), "n": len(rt)},
        "raw_bwrap_ms": {**percentiles(raw, 50), "n": len(raw)},
    }


def protocol_figures(root: Path, quick: bool) -> dict[str, Any]:
    """Warm TTFC and exec round trip for each of PROTOCOLS, side by side: a server each,
    all running at once, measured in alternating rounds."""
    rounds = 2 if quick else PROTOCOL_ROUNDS
    count, roundtrips = (20, 200) if quick else (100, 1000)  # per protocol, over the rounds
    samples: dict[str, dict[str, list[Any]]] = {n: {"warm": [], "exec": []} for n in PROTOCOLS}
    load_before = os.getloadavg()
    with ExitStack() as servers:
        urls = {
            name: start(servers, root, name, 4, {"CORRAL_HTTP_SERVER": http_server})
            for name, (http_server, _) in PROTOCOLS.items()
        }
        time.sleep(1.0)  # let the pools fill
        for _ in range(rounds):
            for name, (_, protocol) in PROTOCOLS.items():
                url, key = urls[name]
                os.environ["CORRAL_PROTOCOL"] = protocol  # read by the SDK's ClientSettings
                try:
                    got = asyncio.run(ttfc(url, key, count // rounds, 0, WARM_PACE))
                    samples[name]["warm"] += got["sequential"]
                    rt = asyncio.run(api_roundtrips(url, key, roundtrips // rounds))
                    samples[name]["exec"] += rt
                finally:
                    del os.environ["CORRAL_PROTOCOL"]
    figures: dict[str, Any] = {}
    for name, of_name in samples.items():
        rt = of_name["exec"]
        figures[name] = {
            "ttfc_warm_ms": summary(of_name["warm"]),
            "exec_roundtrip_ms": {**percentiles(rt, 50, 95, 99), "n": len(rt)},
        }
    base = figures["connect_uvicorn"]
    figures["vs_connect_uvicorn"] = {
        name: {
            figure: round(figures[name][figure]["p50"] / base[figure]["p50"], 3)
            for figure in ("ttfc_warm_ms", "exec_roundtrip_ms")
            if "p50" in figures[name][figure] and "p50" in base[figure]
        }
        for name in PROTOCOLS
    }
    figures["load"] = {"before": load_before, "after": os.getloadavg()}
    return figures


def database_figures(root: Path, quick: bool) -> dict[str, Any]:
    """Warm TTFC and exec round trip with each store, one server each, in turn."""
    count, roundtrips = (20, 200) if quick else (100, 1000)
    figures: dict[str, Any] = {}
    for name in ("sqlite", "postgresql"):
        with (
            database(name) as database_url,
            running_server(root, f"db-{name}", pool_size=4, database_url=database_url) as (
                url,
                key,
            ),
        ):
            warm = asyncio.run(ttfc(url, key, count, 0, WARM_PACE))
            rt = asyncio.run(api_roundtrips(url, key, roundtrips))
        figures[name] = {
            "ttfc_warm_ms": summary(warm["sequential"]),
            "exec_roundtrip_ms": {**percentiles(rt, 50, 95, 99), "n": len(rt)},
        }
    return figures


def summary(samples: list[float | None]) -> dict[str, Any]:
    ok = [s for s in samples if s is not None]
    figures: dict[str, Any] = percentiles(ok, 50, 95, 99) if ok else {}
    return {**figures, "n": len(samples), "ok": len(ok)}


def main(quick: bool) -> dict[str, Any]:
    count, burst = (20, 10) if quick else (100, 50)
    root = Path(tempfile.mkdtemp(prefix="corral-bench-api-"))
    os.chmod(root, 0o711)
    report: dict[str, Any] = {}
    all_samples: list[float | None] = []
    try:
        with running_server(root, "warm", pool_size=4) as (url, key):
            warm = asyncio.run(ttfc(url, key, count, burst, WARM_PACE))
            rt = asyncio.run(api_roundtrips(url, key, 200 if quick else 1000))
        with running_server(root, "cold", pool_size=0) as (url, key):
            cold = asyncio.run(ttfc(url, key, count, burst, 0))
        report["ttfc_warm_ms"] = summary(warm["sequential"])
        report["ttfc_warm_burst_ms"] = summary(warm["burst"])
        report["ttfc_cold_ms"] = summary(cold["sequential"])
        report["ttfc_cold_burst_ms"] = summary(cold["burst"])
        report["ttfc_warm_pace_ms"] = WARM_PACE * 1000
        report["exec_roundtrip_ms"] = {**percentiles(rt, 50, 95, 99), "n": len(rt)}
        for series in (warm, cold):
            all_samples += series["sequential"] + series["burst"]
        report["success_rate"] = round(
            sum(s is not None for s in all_samples) / len(all_samples), 4
        )
        report["protocols"] = protocol_figures(root, quick)
        report["databases"] = database_figures(root, quick)
        report.update(asyncio.run(engine_figures(root, quick)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
