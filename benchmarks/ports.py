"""Port proxy benchmark: a small HTTP GET through the server's port proxy, against the same
GET straight to the same web server over loopback.

    sudo uv run python benchmarks/ports.py --json

Root only (the proxy enters sandboxes' network namespaces; so does the baseline). A
`corral server` subprocess runs one sandbox (network "none") serving tests/kit/webapp.py
on port 8000. In alternating rounds, with one keep-alive HTTP client each:
- `proxy`: GET /sandboxes/<id>/ports/8000/ping through the server (path form, token in
  the header): client -> server -> a new connection into the sandbox -> the web app;
- `direct`: the same GET to 127.0.0.1:8000 from a thread of this process that entered the
  sandbox's network namespace: client -> the web app, over the same loopback.
Then the same for a WebSocket: round trips of a small message to the app's echo, through
the proxy's byte relay and directly. Prints p50/p95 (ms) of each, the overhead (p50 proxy
- p50 direct) and the ratio, and the load average before and after (the machine is
shared). Target: GET overhead p50 <= 1 ms.

Then the two byte paths into a sandbox, in the engine (no server): a new connection and
one GET (`Connection: close`) over `Sandbox.open_port` (the host in the sandbox's
namespace: the root path) and over `open_port_via_agent` (the guest agent relays: the
path without root).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' kit

import httpx
from api import CGROUP_PARENT, running_server
from engine import percentiles, run_cli

from corral import Sandbox
from corral.config import Settings
from corral.isolation import Engine
from corral.isolation import Sandbox as EngineSandbox
from corral.network.setns import enter_netns
from tests.kit import webapp

PORT = 8000


def app_pid(marker: str) -> int:
    """The host pid of the process whose command line names `marker`."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        return int(entry)
            except OSError:
                continue
    raise SystemExit(f"no process runs {marker}")


def timed_gets(client: httpx.Client, url: str, count: int, headers: dict[str, str]) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        response = client.get(url, headers=headers)
        samples.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise SystemExit(f"GET {url}: {response.status_code} {response.text}")
    return samples


def websocket_echoes(
    address: tuple[str, int], target: str, headers: dict[str, str], count: int
) -> list[float]:
    """ms per round trip of a small message over one WebSocket to the web app's echo."""
    with socket.create_connection(address, timeout=30) as sock, sock.makefile("rb") as stream:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(webapp.upgrade_request(f"{address[0]}:{address[1]}", target, headers))
        status, _ = webapp.read_head(stream)
        if status != 101:
            raise SystemExit(f"WebSocket upgrade of {target}: {status}")
        samples = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(webapp.frame(1, b"ping", mask=b"abcd"))
            if webapp.read_frame(stream) != (1, b"ping"):
                raise SystemExit("the echo answered something else")
            samples.append((time.perf_counter() - start) * 1000)
        sock.sendall(webapp.frame(8, b"", mask=b"abcd"))
    return samples


class DirectClient(threading.Thread):
    """The same requests to the web app from inside the sandbox's network namespace, in
    a thread of their own (only it enters the namespace), round by round when `turn`
    says so: GETs, then WebSocket round trips."""

    def __init__(self, pid: int, count: int, rounds: int, turn: threading.Barrier) -> None:
        super().__init__(name="in-sandbox")
        self.pid, self.count, self.rounds, self.turn = pid, count, rounds, turn
        self.samples: list[float] = []
        self.echoes: list[float] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            enter_netns(f"/proc/{self.pid}/ns/net")
            url = f"http://127.0.0.1:{PORT}/ping"
            with httpx.Client(trust_env=False) as client:
                for _ in range(self.rounds):
                    self.turn.wait()
                    self.samples += timed_gets(client, url, self.count, {})
                    self.turn.wait()
            self.turn.wait()
            self.echoes = websocket_echoes(("127.0.0.1", PORT), "/ws", {}, self.count * 2)
            self.turn.wait()
        except BaseException as exc:
            self.failure = exc
            self.turn.abort()


Series = dict[str, list[float]]


def measure(url: str, key: str, count: int, rounds: int) -> Series:
    """Latencies in ms, proxy and direct, in alternating rounds: GETs, WebSocket echoes."""
    with Sandbox.create(timeout=600, server=url, api_key=key) as sbx:
        marker = f"bench-web-{secrets.token_hex(6)}.py"
        sbx.files.write(marker, webapp.SOURCE)
        sbx.commands.run(f"python3 /workspace/{marker} {PORT}", background=True)
        proxied = sbx.get_url(PORT, "/ping").split("?")[0]
        headers = {"X-Corral-Traffic-Token": sbx.traffic_token}
        deadline = time.monotonic() + 30
        while httpx.get(proxied, headers=headers).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the web app did not answer through the proxy")
            time.sleep(0.05)
        turn = threading.Barrier(2)
        direct = DirectClient(app_pid(marker), count, rounds, turn)
        direct.start()
        proxy: list[float] = []
        try:
            with httpx.Client(trust_env=False) as client:
                timed_gets(client, proxied, 20, headers)  # warm-up
                for _ in range(rounds):
                    turn.wait()  # the direct client's round
                    turn.wait()
                    proxy += timed_gets(client, proxied, count, headers)
            turn.wait()  # the direct client's echoes
            turn.wait()
            server = urlsplit(url)
            address = (server.hostname or "127.0.0.1", server.port or 80)
            target = f"/sandboxes/{sbx.sandbox_id}/ports/{PORT}/ws"
            echoes = websocket_echoes(address, target, headers, count * 2)
        finally:
            direct.join()
        if direct.failure is not None:
            raise direct.failure
        return {
            "proxy_get": proxy,
            "direct_get": direct.samples,
            "proxy_ws": echoes,
            "direct_ws": direct.echoes,
        }


async def one_get(opened: Any) -> float:
    """ms for a new connection (from `opened()`) and one GET over it, to the end."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(sock=await opened())
    writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    elapsed = (time.perf_counter() - start) * 1000
    writer.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"unexpected answer: {answer[:80]!r}")
    return elapsed


async def byte_paths(root: Path, count: int) -> dict[str, Any]:
    settings = Settings(runtime_dir=root / "engine", cgroup_parent=CGROUP_PARENT)
    async with Engine(settings) as engine:
        box: EngineSandbox = await engine.create(isolation="namespace")
        try:
            await box.write_file("web.py", webapp.SOURCE.encode())
            await box.exec(["python3", "web.py", str(PORT)], background=True)
            deadline = time.monotonic() + 30
            while True:
                try:
                    await one_get(lambda: box.open_port(PORT))
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
            netns, agent = [], []
            for _ in range(count):
                netns.append(await one_get(lambda: box.open_port(PORT)))
                agent.append(await one_get(lambda: box.open_port_via_agent(PORT)))
        finally:
            await box.destroy()
    return {
        "engine_connect_get_netns_ms": {**percentiles(netns, 50, 95), "n": len(netns)},
        "engine_connect_get_agent_ms": {**percentiles(agent, 50, 95), "n": len(agent)},
    }


def main(quick: bool) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("run as root: the port proxy and the baseline enter network namespaces")
    count, rounds = (50, 4) if quick else (200, 10)
    root = Path(tempfile.mkdtemp(prefix="corral-bench-ports-"))
    os.chmod(root, 0o711)
    load_before = os.getloadavg()
    try:
        with running_server(root, "ports", pool_size=1) as (url, key):
            series = measure(url, key, count, rounds)
        paths = asyncio.run(byte_paths(root, count))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report: dict[str, Any] = {}
    for kind in ("get", "ws"):
        proxied = percentiles(series[f"proxy_{kind}"], 50, 95)
        direct = percentiles(series[f"direct_{kind}"], 50, 95)
        report[f"proxy_{kind}_ms"] = {**proxied, "n": len(series[f"proxy_{kind}"])}
        report[f"direct_{kind}_ms"] = {**direct, "n": len(series[f"direct_{kind}"])}
        report[f"{kind}_overhead_p50_ms"] = round(proxied["p50"] - direct["p50"], 3)
        report[f"{kind}_ratio_p50"] = round(proxied["p50"] / direct["p50"], 2)
    return {
        **report,
        "target_get_overhead_p50_ms": 1.0,
        **paths,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    run_cli(__doc__, main)
