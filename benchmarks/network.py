"""Network benchmark: what a sandbox's network costs, against the bare path.

    sudo uv run python benchmarks/network.py --json

Root only. Runs inside the tests' fake internet (tests/kit/internet.py): no packet leaves
the machine. The engine runs in the fake internet's gateway namespace (joined with
nsenter), so sandbox uplinks hang off the gateway; the "bare" path is a namespace
attached to the same gateway by a veth, with no rules, no NAT and no sandbox.

- `start_ms`: sandbox create -> the output of `echo` in it (a one-shot sandbox), for
  network `none`, `internet` and `allowlist`, interleaved, one create every 50 ms (what
  the start costs the network adds is `internet`/`allowlist` minus `none`);
- `first_get_ms`: one HTTP GET on a new connection to the fake `allowed.test`, by address,
  from an `internet` sandbox and from the bare namespace;
- `download_mb_s`: a 100 MB download from it (median of 3), both ways, and their ratio;
- `rootless`: the same for an engine running as `nobody` (a slirp4netns uplink instead
  of a veth, `corral.isolation.usernet`), given a delegated cgroup and a usable
  /dev/net/tun in a mount namespace of its own (`tests.kit.rootless`), its ratios
  against the same bare path;
- `proxy`: an exposed port through the server's port proxy against the same GET over the
  sandbox's own loopback (`benchmarks/ports.py`, run here too, so one run has every
  figure the issue asks for).

Targets (`targets`): the network adds <= 10 ms p50 to a start, the download from a sandbox
is >= 0.8x the bare path's, and the proxy adds <= 1 ms p50 to a GET.

Prints one JSON object; times in ms (p50/p95), with the 1-minute load average before and
after (other benchmarks and tests may share the machine).
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

import ports
from engine import percentiles
from network_paths import DOWNLOAD, DOWNLOAD_BYTES, GET

from tests.kit import internet as fake
from tests.kit import rootless

ALLOWLIST = ["allowed.test:80", f"{fake.ALLOWED_V4}/32"]


async def inside(runtime_dir: str, rounds: int, cgroup_parent: str | None) -> dict[str, Any]:
    """The engine's side, run in the gateway namespace."""
    from corral.config import Settings
    from corral.isolation import Engine, Entrypoint
    from corral.network.policy import NetworkPolicy

    settings = Settings(
        runtime_dir=Path(runtime_dir),
        data_dir=Path(runtime_dir) / "data",
        network_dns=f"{fake.DNS_V4},{fake.DNS_V6}",
        **({"cgroup_parent": cgroup_parent} if cgroup_parent else {}),
    )
    policies = {
        "none": NetworkPolicy.parse("none"),
        "internet": NetworkPolicy.parse("internet"),
        "allowlist": NetworkPolicy.parse("allowlist", ALLOWLIST),
    }
    start: dict[str, list[float]] = {name: [] for name in policies}
    async with Engine(settings) as engine:
        for _ in range(rounds):
            for name, policy in policies.items():
                began = time.perf_counter()
                sandbox = await engine.create(network=policy, entrypoint=Entrypoint(["echo", "hi"]))
                assert sandbox.entry is not None
                result = await sandbox.entry.collect()
                start[name].append((time.perf_counter() - began) * 1000)
                assert result.stdout == b"hi\n", result
                await sandbox.destroy()
                await asyncio.sleep(0.05)
        sandbox = await engine.create(network="internet")

        async def python(code: str) -> float:
            return float((await sandbox.run(["python3", "-c", code])).stdout)

        try:
            gets = [await python(GET.format(host=fake.ALLOWED_V4)) for _ in range(rounds)]
            download = DOWNLOAD.format(host=fake.ALLOWED_V4, size=DOWNLOAD_BYTES)
            rates = [await python(download) for _ in range(3)]
        finally:
            await sandbox.destroy()
    return {
        "start_ms": {name: percentiles(took, 50, 95) for name, took in start.items()},
        "first_get_ms": percentiles(gets, 50, 95),
        "download_mb_s": round(statistics.median(rates)),
    }


def engine_side(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"network: the engine's side failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # the engine's side
    parser.add_argument("--cgroup-parent", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(asyncio.run(inside(args.inside, args.rounds, args.cgroup_parent))))
        return
    if reason := fake.unavailable():
        sys.exit(f"network: {reason}")
    result: dict[str, Any] = {"rounds": args.rounds, "load_before": os.getloadavg()[0]}
    net = fake.build()
    runtime = tempfile.mkdtemp(prefix="corral-bench-")
    try:
        engine = [sys.executable, __file__, "--rounds", str(args.rounds), "--inside"]
        gateway = net.netns(fake.GATEWAY)
        sandbox = engine_side(["nsenter", f"--net=/run/netns/{gateway}", "--", *engine, runtime])
        without_root: dict[str, Any] | None = None
        if not rootless.missing():
            with rootless.home() as home, rootless.delegated_cgroup("corral") as parent:
                command = [*engine, str(home / "run"), "--cgroup-parent", parent]
                without_root = engine_side(rootless.argv(gateway, command))
        bare = net.attach("bare")

        def bare_python(code: str) -> float:
            ran = net.run(bare.name, [sys.executable, "-c", code], timeout=120)
            ran.check_returncode()
            return float(ran.stdout)

        gets = [bare_python(GET.format(host=fake.ALLOWED_V4)) for _ in range(args.rounds)]
        download = DOWNLOAD.format(host=fake.ALLOWED_V4, size=DOWNLOAD_BYTES)
        rates = [bare_python(download) for _ in range(3)]
        starts = sandbox["start_ms"]
        result.update(
            start_ms=starts,
            start_added_p50_ms={
                name: round(starts[name]["p50"] - starts["none"]["p50"], 2)
                for name in ("internet", "allowlist")
            },
            first_get_ms={"sandbox": sandbox["first_get_ms"], "bare": percentiles(gets, 50, 95)},
            download_mb_s={
                "sandbox": sandbox["download_mb_s"],
                "bare": round(statistics.median(rates)),
                "ratio": round(sandbox["download_mb_s"] / statistics.median(rates), 2),
            },
        )
        if without_root is not None:
            starts = without_root["start_ms"]
            result["rootless"] = {
                "start_ms": starts,
                "start_added_p50_ms": {
                    name: round(starts[name]["p50"] - starts["none"]["p50"], 2)
                    for name in ("internet", "allowlist")
                },
                "first_get_ms": without_root["first_get_ms"],
                "download_mb_s": without_root["download_mb_s"],
                "ratio": round(without_root["download_mb_s"] / statistics.median(rates), 2),
            }
    finally:
        net.close()
        shutil.rmtree(runtime, ignore_errors=True)
    result["proxy"] = ports.main(quick=args.rounds < 20)
    result["targets"] = {
        "start_added_p50_ms_at_most": 10,
        "download_ratio_at_least": 0.8,
        "proxy_get_overhead_p50_ms_at_most": 1.0,
    }
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
