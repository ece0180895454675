"""Memory templates: create → ready of a template whose start command warms an
interpreter and serves, started cold vs restored from the template's memory image.

    uv run python benchmarks/memory_templates.py --json      # as root, after `make setup`

One real `corral server` (tests/e2b_sdk/corral_server.py: `base` installed from the local
Debian archive, in a network namespace of its own with loopback only), a template built
`FROM base` whose start command imports a few heavy standard modules (asyncio, email,
http.server, json, sqlite3, decimal, ssl, tarfile, xml.etree, unittest, multiprocessing,
concurrent.futures) and serves HTTP on the sandbox's loopback, its ready check a `curl`
of it. Per tier with memory snapshots (gvisor; microvm where it runs), alternating so the
load hits both alike, through the SDK, from the create call to the first answer of the
server inside the sandbox (a `curl` run in it):
- cold: a create with an environment variable, which a restore cannot honour (the start
  command reads it): the sandbox boots, runs the start command, waits for its ready check;
- restored: a create without, which restores the image (the first such create made it:
  `first_create_ms`, not in the samples).
Latencies in milliseconds; `restored_over_cold` is the ratio of the p50s (target < 1).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from engine import percentiles, run_cli

from corral import Limits, Sandbox, Template

ROOT = Path(__file__).resolve().parent.parent
E2B_ENV = ROOT / "tests" / "e2b_sdk"
PORT = 8000
START = (
    "exec python3 -c 'import asyncio, email.parser, http.server, json, sqlite3, decimal, "
    "ssl, tarfile, xml.etree.ElementTree, unittest, multiprocessing, concurrent.futures; "
    f'http.server.HTTPServer(("127.0.0.1", {PORT}), '
    "http.server.SimpleHTTPRequestHandler).serve_forever()'"
)
READY = f"curl -sf -o /dev/null http://127.0.0.1:{PORT}/"
# Per tier: samples (full, quick) and the sandbox's limits (a microvm's memory is its
# guest's RAM, which its image holds whole).
TIERS = {
    "gvisor": ((10, 3), Limits(memory_mib=512)),
    "microvm": ((5, 2), Limits(memory_mib=256)),
}


def _create_to_ready(options: dict[str, Any], envs: dict[str, str] | None) -> tuple[float, str]:
    start = time.perf_counter()
    sbx = Sandbox.create("served", envs=envs, timeout=120, **options)
    try:
        done = sbx.commands.run(READY)
        elapsed = (time.perf_counter() - start) * 1000
        assert done.exit_code == 0, done.stderr
        return elapsed, sbx.info.state_reason
    finally:
        sbx.kill()


def _tier(server_options: dict[str, Any], tier: str, runs: int, limits: Limits) -> dict[str, Any]:
    options = {**server_options, "isolation": tier, "limits": limits}
    first, reason = _create_to_ready(options, None)
    assert "memory image, made now" in reason, reason
    cold, restored = [], []
    for i in range(runs):
        elapsed, reason = _create_to_ready(options, {"RUN": str(i)})
        assert reason == "created", reason
        cold.append(elapsed)
        elapsed, reason = _create_to_ready(options, None)
        assert "memory image (its start command had run)" in reason, reason
        restored.append(elapsed)
    [image] = [
        i for i in Template.get("served", **server_options).memory_images if i.isolation == tier
    ]
    return {
        "first_create_ms": round(first, 1),
        "cold_create_to_ready_ms": {**percentiles(cold, 50), "n": runs},
        "restored_create_to_ready_ms": {**percentiles(restored, 50), "n": runs},
        "restored_over_cold": round(statistics.median(restored) / statistics.median(cold), 2),
        "image_bytes": image.size_bytes,
        "memory_mib": limits.memory_mib,
    }


def main(quick: bool) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("run as root (gvisor and microvm memory snapshots need it)")
    sys.path.insert(0, str(E2B_ENV))
    import corral_server

    corral_server.isolate_network()
    report: dict[str, Any] = {"load_1min_before": round(os.getloadavg()[0], 2)}
    # The guest kernel: CORRAL_GUEST_KERNEL_DIR, else where `make setup` downloads it.
    kernels = os.environ.get("CORRAL_GUEST_KERNEL_DIR") or str(ROOT / ".cache" / "guest-kernel")
    extra = {"CORRAL_GUEST_KERNEL_DIR": kernels}
    with corral_server.running(pool_size=0, extra_env=extra) as server:
        options = {"server": server.url, "api_key": server.key}
        built = Template().from_template("base").set_start_cmd(START, READY)
        Template.build(built, "served", **options)
        for tier, ((full, few), limits) in TIERS.items():
            try:
                report[tier] = _tier(options, tier, few if quick else full, limits)
            except Exception as exc:  # a tier this host lacks: say why, measure the rest
                report[tier] = {"error": str(exc)[:300]}
    report["load_1min_after"] = round(os.getloadavg()[0], 2)
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
