"""Traces benchmark: what CORRAL_OTEL=on costs the API, beside the same server with it off.

    uv run python benchmarks/traces.py --json

The figures of `benchmarks/api.py` (warm and cold time to first command, the warm exec
round trip through the SDK) against servers with traces off and servers with traces on,
exporting every span (the default sampler) over OTLP/HTTP to a loopback receiver that
answers at once, as a collector beside the server would. Off and on take turns, round
after round, so that the load of the machine weighs on both alike. Prints one JSON
object; latencies in milliseconds, `on_vs_off` the ratio of the p50s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api import WARM_PACE, api_roundtrips, start, summary, ttfc
from engine import percentiles, run_cli

ROUNDS = 3


class _Sink(BaseHTTPRequestHandler):
    """A collector that takes every export and answers 200 at once."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def otlp_sink() -> Iterator[str]:
    """A loopback OTLP/HTTP endpoint (for OTEL_EXPORTER_OTLP_ENDPOINT)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def main(quick: bool) -> dict[str, Any]:
    count, burst = (10, 5) if quick else (30, 10)
    root = Path(tempfile.mkdtemp(prefix="corral-bench-traces-"))
    os.chmod(root, 0o711)
    samples: dict[str, dict[str, list[Any]]] = {
        mode: {"warm": [], "cold": [], "exec": []} for mode in ("off", "on")
    }
    try:
        with otlp_sink() as endpoint, ExitStack() as servers:
            modes = {
                "off": {"CORRAL_OTEL": "off"},
                "on": {"CORRAL_OTEL": "on", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint},
            }
            # Four servers started once (a start takes seconds on a loaded machine), then
            # measured in turns.
            warm = {mode: start(servers, root, f"{mode}-warm", 4, modes[mode]) for mode in modes}
            cold = {mode: start(servers, root, f"{mode}-cold", 0, modes[mode]) for mode in modes}
            for _ in range(1 if quick else ROUNDS):
                for mode in modes:
                    url, key = warm[mode]
                    got = asyncio.run(ttfc(url, key, count, burst, WARM_PACE))
                    samples[mode]["warm"] += got["sequential"]
                    samples[mode]["exec"] += asyncio.run(
                        api_roundtrips(url, key, 100 if quick else 300)
                    )
                    url, key = cold[mode]
                    samples[mode]["cold"] += asyncio.run(ttfc(url, key, count, 0, 0))["sequential"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = {}
    for mode, of_mode in samples.items():
        report[f"ttfc_warm_ms_{mode}"] = summary(of_mode["warm"])
        report[f"ttfc_cold_ms_{mode}"] = summary(of_mode["cold"])
        rt = of_mode["exec"]
        report[f"exec_roundtrip_ms_{mode}"] = {**percentiles(rt, 50, 95, 99), "n": len(rt)}
    report["on_vs_off"] = {
        figure: round(report[f"{figure}_on"]["p50"] / report[f"{figure}_off"]["p50"], 3)
        for figure in ("ttfc_warm_ms", "ttfc_cold_ms", "exec_roundtrip_ms")
        if "p50" in report[f"{figure}_on"] and "p50" in report[f"{figure}_off"]
    }
    return report


if __name__ == "__main__":
    run_cli(__doc__, main)
