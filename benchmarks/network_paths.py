"""Network paths benchmark: what each way of giving a sandbox's namespace an uplink costs.

    sudo uv run python benchmarks/network_paths.py --json

Root only (it makes network namespaces). Runs inside the tests' fake internet
(tests/kit/internet.py): no packet leaves the machine. For each path a fresh network
namespace gets an uplink from the fake internet's gateway namespace ("the host"):

- `veth`: a veth pair, addresses and a route (two `ip -batch` calls): the root path;
- `slirp4netns` and `pasta`: the user-mode stacks of the rootless path, attached to the
  namespace and timed until it is usable (slirp4netns' ready fd; pasta: the address is up).

Each path's time includes `ip netns add` and an `nft -f` of a policy-sized ruleset (what
every path needs per sandbox); `netns_add_del_ms` is the namespace alone.

Then from each: one HTTP GET (a new connection) and a download, from the fake
`allowed.test`. Prints one JSON object; times in ms (p50/p95 of `--rounds`), throughput in
MB/s (median of 3). The HTTP server is Python's, so it bounds the throughput of every path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' kit

from engine import percentiles

from tests.kit import internet as fake

# An `internet`-like policy: private ranges denied, DNS only to one resolver, a connection
# cap. The `limit` gates only the log rule: the next rule always counts and decides.
RULESET = """
table inet corral {
  set deny4 { type ipv4_addr; flags interval; elements = { 0.0.0.0/8, 10.0.0.0/8,
    100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/3 } }
  set deny6 { type ipv6_addr; flags interval; elements = { ::/127, ::ffff:0:0/96,
    64:ff9b::/96, 2002::/16, fc00::/7, fe80::/10, ff00::/8 } }
  chain decide {
    ct state established,related accept
    meta l4proto { tcp, udp } th dport 53 ip daddr != 203.0.113.53 limit rate 5/second log group 1
    meta l4proto { tcp, udp } th dport 53 ip daddr != 203.0.113.53 counter drop
    ip daddr @deny4 limit rate 5/second log group 1
    ip daddr @deny4 counter reject
    ip6 daddr @deny6 limit rate 5/second log group 1
    ip6 daddr @deny6 counter reject
    ct state new ct count over 256 counter reject
    counter accept
  }
  chain output {
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    jump decide
  }
}
"""
SANDBOX_V4 = "10.0.2.15"  # inside the user-mode stacks' namespaces
DOWNLOAD_BYTES = 100_000_000
GET = (
    "import time, urllib.request as u\n"
    "t = time.perf_counter(); u.urlopen('http://{host}/', timeout=10).read()\n"
    "print((time.perf_counter() - t) * 1000)\n"
)
DOWNLOAD = (
    "import time, urllib.request as u\n"
    "t = time.perf_counter(); r = u.urlopen('http://{host}/bytes/{size}', timeout=60); n = 0\n"
    "while chunk := r.read(1 << 20): n += len(chunk)\n"
    "print(n / (time.perf_counter() - t) / 1e6)\n"
)


def sh(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def python_in(netns: str, code: str) -> float:
    return float(sh(["ip", "netns", "exec", netns, sys.executable, "-c", code]))


class Paths:
    """Fresh namespaces with an uplink from the fake internet's gateway, one way each."""

    def __init__(self, net: fake.Internet) -> None:
        self.net = net
        self.gateway = net.netns(fake.GATEWAY)
        self.uplink = f"{net.prefix}-up"
        self.count = 0
        self.helpers: list[subprocess.Popen[bytes]] = []

    def fresh(self, ruleset: bool = True) -> str:
        """A new namespace, with the policy's ruleset loaded (every path needs one)."""
        self.count += 1
        netns = self.net.netns(f"b{self.count}")
        sh(["ip", "netns", "add", netns])
        if ruleset:
            sh(["ip", "netns", "exec", netns, "nft", "-f", "-"], RULESET)
        return netns

    def veth(self) -> str:
        netns = self.fresh()
        host_end, k = f"{self.net.prefix}-h{self.count}", self.count
        sh(["ip", "-n", self.gateway, "-batch", "-"], (
            f"link add {host_end} type veth peer name eth0 netns {netns}\n"
            f"addr add 10.250.{k}.1/24 dev {host_end}\nlink set {host_end} up\n"
        ))  # fmt: skip
        sh(["ip", "-n", netns, "-batch", "-"], (
            f"addr add 10.250.{k}.2/24 dev eth0\nlink set eth0 up\nlink set lo up\n"
            f"route add 192.0.2.0/24 via 10.250.{k}.1\n"
        ))  # fmt: skip
        return netns

    def slirp4netns(self) -> str:
        netns = self.fresh()
        ready, ready_w = os.pipe()
        self.helpers.append(subprocess.Popen(
            self.net.exec_argv(fake.GATEWAY, [
                "slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
                f"--ready-fd={ready_w}", "--netns-type=path", f"/run/netns/{netns}", "tap0",
            ]),
            pass_fds=(ready_w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        os.close(ready_w)
        os.read(ready, 1)
        os.close(ready)
        return netns

    def pasta(self) -> str:
        netns = self.fresh()
        helper = subprocess.Popen(
            self.net.exec_argv(fake.GATEWAY, [
                "pasta", "-f", "--config-net", "-i", self.uplink, "-a", SANDBOX_V4, "-n", "24",
                "-g", "10.0.2.2", "--no-map-gw", "-q", "--runas", "0",
                "--netns", f"/run/netns/{netns}",
            ]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.helpers.append(helper)
        while SANDBOX_V4 not in sh(["ip", "-n", netns, "-4", "-o", "addr"]):
            if helper.poll() is not None:
                raise RuntimeError(f"pasta exited with {helper.returncode}")
            time.sleep(0.001)
        return netns

    def close(self) -> None:
        for helper in self.helpers:
            helper.send_signal(signal.SIGTERM)
            helper.wait(10)
        for netns in self.net.namespaces():
            if netns.startswith(self.net.netns("b")):
                fake.delete_netns(netns)


def timed(make: Callable[[], str], rounds: int) -> tuple[list[float], list[str]]:
    took, made = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        made.append(make())
        took.append((time.perf_counter() - start) * 1000)
    return took, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if reason := fake.unavailable():
        sys.exit(f"network_paths: {reason}")
    tools = {name: shutil.which(name) for name in ("slirp4netns", "pasta")}
    net = fake.build()
    paths = Paths(net)
    result: dict[str, Any] = {"rounds": args.rounds, "load_before": os.getloadavg()[0]}
    try:
        start = time.perf_counter()
        for _ in range(args.rounds):
            netns = paths.fresh(ruleset=False)
            fake.delete_netns(netns)
        result["netns_add_del_ms"] = round((time.perf_counter() - start) * 1000 / args.rounds, 2)
        for name, make in (("veth", paths.veth), ("slirp4netns", paths.slirp4netns),
                           ("pasta", paths.pasta)):  # fmt: skip
            if name in tools and tools[name] is None:
                result[name] = {"skipped": f"{name} is not installed: run `make setup`"}
                continue
            took, made = timed(make, args.rounds)
            host = fake.ALLOWED_V4
            gets = [python_in(netns, GET.format(host=host)) for netns in made]
            download = DOWNLOAD.format(host=host, size=DOWNLOAD_BYTES)
            rates = [python_in(made[0], download) for _ in range(3)]
            result[name] = {
                "attach_ms": percentiles(took, 50, 95),
                "first_get_ms": percentiles(gets, 50, 95),
                "download_mb_s": round(statistics.median(rates)),
            }
        bare = result["veth"]["download_mb_s"]
        for name in ("slirp4netns", "pasta"):
            if "download_mb_s" in result[name]:
                result[name]["throughput_vs_veth"] = round(result[name]["download_mb_s"] / bare, 2)
    finally:
        paths.close()
        net.close()
    result["load_after"] = os.getloadavg()[0]
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
