"""Decompression bomb: the server's peak memory and event-loop stall for one gzip bomb.

    uv run python benchmarks/bomb.py --json                     # this checkout
    uv run python benchmarks/bomb.py --json --checkout ../old   # another checkout's server

Each case starts a fresh `corral server` (loopback, no warm pool) from the checkout's own
virtualenv, sends one request whose body is gzip of 300 MiB of zeros (~300 KiB on the
wire), and reports the server's peak resident memory (VmHWM of /proc/<pid>/status) before
and after, the answer, and the event-loop stall: the longest `GET /healthz` round trip of
a client polling every 5 ms while the bomb is handled, beside the longest before it.

Cases: HealthService/Check unary (`Content-Encoding: gzip`, no key; also with a 60 MiB
bomb, ~60 KiB of gzip, under Health's 64 KiB wire limit), the same as a gRPC-Web
envelope with the compressed flag (no key), SandboxService/List without a key, and
SandboxService/List with the default team's valid key.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from common import free_port, print_report, wait_answering

BOMB_MIB = 300
# 60 MiB of zeros is ~60 KiB of gzip: under HealthService's 64 KiB wire limit, so only
# the decompression bound stops it.
SMALL_BOMB = gzip.compress(bytes(60 << 20), compresslevel=9)
HEALTH = "/corral.v1.HealthService/Check"
LIST = "/corral.v1.SandboxService/List"
GZIP_JSON = {"Content-Type": "application/json", "Content-Encoding": "gzip"}


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


class Server:
    """A `corral server` of `checkout` on a free loopback port, in its own data dir."""

    def __init__(self, checkout: Path, root: Path) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        data = root / f"data-{port}"
        env = {
            **os.environ,
            "CORRAL_DATA_DIR": str(data),
            "CORRAL_RUNTIME_DIR": str(root / "run"),
            "CORRAL_CGROUP_PARENT": "corral-bench",
            "CORRAL_POOL_SIZE": "0",
            "CORRAL_LOG_LEVEL": "warning",
            "CORRAL_CONFIG": str(root / "config"),
        }
        for name in ("CORRAL_SERVER", "CORRAL_API_KEY", "CORRAL_CONTEXT"):
            env.pop(name, None)
        python = checkout / ".venv" / "bin" / "python"
        self.process = subprocess.Popen(
            [str(python), "-m", "corral.cli", "server", "--port", str(port)],
            env=env,
            cwd=checkout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_answering(self.url, self.process, f"the server of {checkout}", timeout=60)
        self.key = (data / "default.key").read_text().strip()
        time.sleep(1.0)  # let start-up settle before the baseline

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class StallProbe:
    """Polls `GET /healthz` every 5 ms; the longest round trip while it ran."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self.longest = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                client.get(self._url + "/healthz")
                self.longest = max(self.longest, time.perf_counter() - started)
                time.sleep(0.005)

    def __enter__(self) -> StallProbe:
        self._thread.start()
        time.sleep(0.3)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cases(bomb: bytes, key: str) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    envelope = struct.pack(">BI", 1, len(bomb)) + bomb
    return {
        "health_unary_gzip_no_key_60_mib": (HEALTH, SMALL_BOMB, GZIP_JSON),
        "health_unary_gzip_no_key": (HEALTH, bomb, GZIP_JSON),
        "health_grpc_web_compressed_flag_no_key": (
            HEALTH,
            envelope,
            {"Content-Type": "application/grpc-web+proto", "grpc-encoding": "gzip"},
        ),
        "sandbox_list_gzip_no_key": (LIST, bomb, GZIP_JSON),
        "sandbox_list_gzip_valid_key": (
            LIST,
            bomb,
            {**GZIP_JSON, "Authorization": f"Bearer {key}"},
        ),
    }


def _answer(response: httpx.Response) -> str:
    text = response.content[:300].decode("utf-8", "replace")
    return f"{response.status_code} {text}"


def measure(checkout: Path, case: str, bomb: bytes, root: Path) -> dict[str, Any]:
    server = Server(checkout, root)
    try:
        pid = server.process.pid
        path, body, headers = _cases(bomb, server.key)[case]
        with StallProbe(server.url) as baseline:
            time.sleep(1.0)
        rss_before = _status_kib(pid, "VmRSS")
        hwm_before = _status_kib(pid, "VmHWM")
        with StallProbe(server.url) as probe:
            started = time.perf_counter()
            response = httpx.post(server.url + path, content=body, headers=headers, timeout=120)
            seconds = time.perf_counter() - started
            time.sleep(0.2)
        hwm_after = _status_kib(pid, "VmHWM")
        return {
            "answer": _answer(response),
            "request_seconds": round(seconds, 3),
            "rss_before_mib": round(rss_before / 1024, 1),
            "peak_before_mib": round(hwm_before / 1024, 1),
            "peak_after_mib": round(hwm_after / 1024, 1),
            "peak_growth_mib": round((hwm_after - hwm_before) / 1024, 1),
            "loop_stall_ms": round(probe.longest * 1000, 1),
            "healthz_longest_idle_ms": round(baseline.longest * 1000, 1),
            "server_alive": server.process.poll() is None,
        }
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--checkout",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the checkout whose server to measure (its .venv runs it); default: this one",
    )
    args = parser.parse_args()
    bomb = gzip.compress(bytes(BOMB_MIB << 20), compresslevel=9)
    root = Path(tempfile.mkdtemp(prefix="corral-bomb-"))
    try:
        report: dict[str, Any] = {
            "checkout": str(args.checkout.resolve()),
            "commit": subprocess.run(
                ["git", "-C", str(args.checkout), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip(),
            "bomb_wire_kib": round(len(bomb) / 1024, 1),
            "bomb_inflated_mib": BOMB_MIB,
            "cases": {case: measure(args.checkout, case, bomb, root) for case in _cases(bomb, "")},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_report(report, args.json)


if __name__ == "__main__":
    main()
