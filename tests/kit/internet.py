"""A fake internet, built per test session from network namespaces, with no way out.

The network tests must never send a packet to a real address, yet they must prove what a
sandbox can and cannot reach. So they get their own internet: two network namespaces made
as root with `ip netns`, and clients attached to it on demand.

```
 client ns (attach)         gateway ns ("the host")           internet ns
 10.250.K.2      ──veth──  10.250.K.1
 fd00:250:0:K::2           fd00:250:0:K::1
                           192.0.2.1     ──veth──  192.0.2.10     2001:db8::10  allowed.test
                           2001:db8::1             198.51.100.10  2001:db8::20  denied.test
                                                   10.99.0.10                   private.test
                                                   169.254.169.254              metadata
                                                   203.0.113.53   2001:db8::53  DNS
                                                   198.51.100.53                another DNS
```

The gateway namespace plays the host: the Corral server (or a sandbox's uplink: a veth, or
pasta/slirp4netns running there) goes in it with `Internet.exec_argv(GATEWAY, ...)`, and
whatever it routes reaches the internet namespace, where `tests.kit.fakehosts` serves
HTTP (ports 80 and 8080), UDP echo (7) and DNS (53) on the addresses above. Every
namespace routes only the test prefixes: there is no default route anywhere, so a packet
to any other address fails with "network unreachable" where it starts (the self-tests
read every routing table to prove it). `ip netns exec` mounts /etc/netns/NAME/resolv.conf
over /etc/resolv.conf, so programs in the gateway and in clients resolve names with the
fake DNS server.

Names carry a random per-session prefix: test runs in other worktrees build their own
internet at the same time, in namespaces of their own. `Internet.close` removes every
namespace, veth and file it made, also after a failure half-way through building; what a
SIGKILLed session leaves is swept by the next one (`sweep`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.kit import processes
from tests.kit.polling import wait_until

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_V4, ALLOWED_V6 = "192.0.2.10", "2001:db8::10"
DENIED_V4, DENIED_V6 = "198.51.100.10", "2001:db8::20"
PRIVATE_V4 = "10.99.0.10"
METADATA_V4 = "169.254.169.254"
DNS_V4, DNS_V6 = "203.0.113.53", "2001:db8::53"
OTHER_DNS_V4 = "198.51.100.53"  # a resolver that is not the sandbox's: raw queries to it

# Which host answers at which address (the HTTP body names it), and the fake DNS zone.
HTTP_HOSTS = {
    ALLOWED_V4: "allowed.test",
    ALLOWED_V6: "allowed.test",
    DENIED_V4: "denied.test",
    DENIED_V6: "denied.test",
    PRIVATE_V4: "private.test",
    METADATA_V4: "metadata",
}
DNS_SERVERS = (DNS_V4, DNS_V6, OTHER_DNS_V4)
ZONE = {
    "allowed.test": [ALLOWED_V4, ALLOWED_V6],
    "*.allowed.test": [ALLOWED_V4, ALLOWED_V6],  # wildcard allowlist entries
    "denied.test": [DENIED_V4, DENIED_V6],
    "private.test": [PRIVATE_V4],
    "rebind.test": [PRIVATE_V4],  # a public-looking name that resolves to a private host
    "metadata.test": [METADATA_V4],
}

# The gateway's side of the internet link, and the only prefixes routed anywhere.
GATEWAY_V4, GATEWAY_V6 = "192.0.2.1", "2001:db8::1"
GATEWAY_ADDRESSES = (GATEWAY_V4, GATEWAY_V6)
TEST_PREFIXES = (
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "10.99.0.0/24",
    "169.254.169.254/32",
    "2001:db8::/32",
)
# Clients attached to the gateway take /24 (v4) and /64 (v6) number K from these.
CLIENT_POOL_V4, CLIENT_POOL_V6 = "10.250.0.0/16", "fd00:250::/32"

GATEWAY, INTERNET = "gw", "inet"  # the namespaces' short names (see Internet.netns)
NETNS_DIR = Path("/etc/netns")
# One file a live fake internet, named by its prefix, holding the pid of the session that
# built it: a session killed with SIGKILL cannot clean up, the next one does (`sweep`).
OWNERS_DIR = Path("/run/corral-test-internet")


def unavailable() -> str | None:
    """Why this host cannot build the fake internet, or None when it can."""
    if os.geteuid() != 0:
        return "the fake internet needs root (network namespaces are made with `ip netns`)"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        return f"the fake internet needs {' and '.join(missing)}: run `make setup`"
    return None


def ip(*args: str, netns: str | None = None) -> str:
    """Run `ip [-n NETNS] ARGS...` and return its output; fail with its stderr."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def delete_netns(netns: str) -> None:
    """`ip netns del`, quiet when it is already gone (a sweep may have been first)."""
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


@dataclass
class Client:
    """A namespace attached to the gateway: the vantage point of a self-test."""

    name: str  # for Internet.run / exec_argv
    netns: str
    v4: str
    v6: str


@dataclass
class Internet:
    """The fake internet of one test session (see the module docstring)."""

    prefix: str
    clients: list[Client] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    _cleanup: ExitStack = field(default_factory=ExitStack)
    _seen_lock: threading.Lock = field(default_factory=threading.Lock)

    def netns(self, name: str) -> str:
        """The real name of this session's namespace `name` (GATEWAY, INTERNET, a client)."""
        return f"{self.prefix}-{name}"

    def exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this session's namespace `name` (resolving with the fake DNS)."""
        return ["ip", "netns", "exec", self.netns(name), *argv]

    def run(
        self, name: str, argv: Sequence[str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in namespace `name` to its end; its output, whatever its exit code."""
        return subprocess.run(
            self.exec_argv(name, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    # -- building ----------------------------------------------------------------------------

    def _add_netns(self, name: str) -> str:
        netns = self.netns(name)
        ip("netns", "add", netns)
        self._cleanup.callback(delete_netns, netns)
        ip("link", "set", "lo", "up", netns=netns)
        resolv = NETNS_DIR / netns / "resolv.conf"
        resolv.parent.mkdir(parents=True, exist_ok=True)
        self._cleanup.callback(shutil.rmtree, resolv.parent, ignore_errors=True)
        resolv.write_text(f"nameserver {DNS_V4}\nnameserver {DNS_V6}\n")
        return netns

    def _add_veth(self, name: str, netns: str, peer: str, peer_netns: str) -> None:
        # Made inside both namespaces at once: never, even briefly, in the host's.
        ip(*f"link add {name} netns {netns} type veth peer name {peer} netns {peer_netns}".split())
        ip("link", "set", name, "up", netns=netns)
        ip("link", "set", peer, "up", netns=peer_netns)

    def _build(self) -> None:
        gateway, internet = self._add_netns(GATEWAY), self._add_netns(INTERNET)
        up, down = f"{self.prefix}-up", f"{self.prefix}-dn"
        self._add_veth(up, gateway, down, internet)
        ip("addr", "add", f"{GATEWAY_V4}/24", "dev", up, netns=gateway)
        ip("-6", "addr", "add", f"{GATEWAY_V6}/64", "dev", up, "nodad", netns=gateway)
        link4 = ipaddress.ip_network(f"{GATEWAY_V4}/24", strict=False)
        for prefix in TEST_PREFIXES:  # v6: the link's /64 holds every v6 host
            network = ipaddress.ip_network(prefix)
            if network.version == 4 and not network.overlaps(link4):
                ip("route", "add", prefix, "via", ALLOWED_V4, netns=gateway)
        for version in ("ipv4", "ipv6"):
            self.run(
                GATEWAY, ["sysctl", "-qw", f"net.{version}.conf.all.forwarding=1"]
            ).check_returncode()
        # The hosts' addresses live on the internet's end of the link (those off the link's
        # subnets as /32); replies to clients go back through the gateway: the client pools
        # are the internet namespace's only routes besides its link.
        for address in dict.fromkeys([*HTTP_HOSTS, *DNS_SERVERS]):
            if ipaddress.ip_address(address).version == 6:
                ip("-6", "addr", "add", f"{address}/64", "dev", down, "nodad", netns=internet)
            else:
                length = 24 if ipaddress.ip_address(address) in link4 else 32
                ip("addr", "add", f"{address}/{length}", "dev", down, netns=internet)
        ip("route", "add", CLIENT_POOL_V4, "via", GATEWAY_V4, netns=internet)
        ip("-6", "route", "add", CLIENT_POOL_V6, "via", GATEWAY_V6, netns=internet)

    def _start_hosts(self) -> None:
        spec = {"http": HTTP_HOSTS, "dns": list(DNS_SERVERS), "zone": ZONE}
        root = Path(__file__).resolve().parents[2]
        argv = [sys.executable, "-m", "tests.kit.fakehosts", json.dumps(spec)]
        hosts = processes.spawn(
            self.exec_argv(INTERNET, argv),
            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self._cleanup.callback(processes.stop, hosts, timeout=10)
        assert hosts.stdout is not None
        threading.Thread(target=self._collect, args=(hosts.stdout,), daemon=True).start()
        wait_until(lambda: self.saw(service="ready") or hosts.poll() is not None, "the fake hosts")
        if hosts.poll() is not None:
            raise RuntimeError(
                f"the fake hosts exited with {hosts.returncode} before they were ready"
            )

    def _collect(self, stdout: IO[str]) -> None:
        for line in stdout:
            with self._seen_lock:
                self.seen.append(json.loads(line))

    # -- using -------------------------------------------------------------------------------

    def saw(self, **match: Any) -> list[dict[str, Any]]:
        """The requests the fake hosts reported that match every key given (e.g.
        `service="http", address=METADATA_V4`): proof that a packet arrived, or never did."""
        with self._seen_lock:
            return [e for e in self.seen if all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, what: str = "a request", **match: Any) -> list[dict[str, Any]]:
        """`saw(**match)` once it is not empty: a host reports a request before it answers,
        but the report reaches this process a moment later."""
        return wait_until(lambda: self.saw(**match), f"the fake hosts to see {what} {match}")

    def attach(self, name: str) -> Client:
        """A new namespace `name` (at most 5 characters) linked to the gateway, routing only
        the test prefixes through it."""
        k = len(self.clients) + 1
        net4 = ipaddress.IPv4Network((ipaddress.IPv4Network(CLIENT_POOL_V4)[k << 8], 24))
        net6 = ipaddress.IPv6Network((ipaddress.IPv6Network(CLIENT_POOL_V6)[k << 64], 64))
        netns = self._add_netns(name)
        here, there = f"{self.prefix}-{name}", f"{self.prefix}-{name}g"
        self._add_veth(here, netns, there, self.netns(GATEWAY))
        ip("addr", "add", f"{net4[1]}/24", "dev", there, netns=self.netns(GATEWAY))
        ip("-6", "addr", "add", f"{net6[1]}/64", "dev", there, "nodad", netns=self.netns(GATEWAY))
        ip("addr", "add", f"{net4[2]}/24", "dev", here, netns=netns)
        ip("-6", "addr", "add", f"{net6[2]}/64", "dev", here, "nodad", netns=netns)
        for prefix in TEST_PREFIXES:
            gateway = net4[1] if ipaddress.ip_network(prefix).version == 4 else net6[1]
            ip("route", "add", prefix, "via", str(gateway), netns=netns)
        client = Client(name=name, netns=netns, v4=str(net4[2]), v6=str(net6[2]))
        self.clients.append(client)
        return client

    def namespaces(self) -> list[str]:
        """This session's namespaces that exist now."""
        return [n for n in ip("netns", "list").split() if n.startswith(f"{self.prefix}-")]

    def close(self) -> None:
        """Remove everything this internet made (in reverse order); safe to call twice."""
        self._cleanup.close()
        for directory in (NETNS_DIR, OWNERS_DIR):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()


def escape_routes(netns: str) -> list[str]:
    """The routes of `netns` (every table, v4 and v6) that lead anywhere but into the fake
    internet: a default route, or a destination outside the test prefixes, the client pools
    and link-local. Read from the tables: no packet is sent."""
    inside = [
        ipaddress.ip_network(n)
        for n in (*TEST_PREFIXES, CLIENT_POOL_V4, CLIENT_POOL_V6, "fe80::/10")
    ]
    escapes = []
    for family in ("-4", "-6"):
        for line in ip(family, "route", "show", "table", "all", netns=netns).splitlines():
            words = line.split()
            # Table local's routes deliver to this namespace's own addresses only.
            if words[0] in ("local", "broadcast", "multicast", "anycast"):
                continue
            if words[0] == "default":
                escapes.append(line)
                continue
            destination = ipaddress.ip_network(words[0])
            if not any(_within(destination, n) for n in inside):
                escapes.append(line)
    return escapes


def _within(network: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(network, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return network.subnet_of(outer)
    if isinstance(network, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return network.subnet_of(outer)
    return False


def sweep() -> list[str]:
    """Remove the fake internets whose session died without cleaning up (SIGKILL); the
    prefixes removed. Live sessions (other worktrees' runs) are left alone."""
    removed = []
    for owner in OWNERS_DIR.glob("cfi*") if OWNERS_DIR.is_dir() else ():
        try:
            os.kill(int(owner.read_text()), 0)
            continue  # its session still runs
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        prefix = owner.name
        for netns in ip("netns", "list").split():
            if netns.startswith(f"{prefix}-"):
                delete_netns(netns)
        for directory in NETNS_DIR.glob(f"{prefix}-*"):
            shutil.rmtree(directory, ignore_errors=True)
        owner.unlink(missing_ok=True)
        removed.append(prefix)
    return removed


def build() -> Internet:
    """A fresh fake internet; on any failure, what was built is removed before raising."""
    sweep()
    internet = Internet(prefix=f"cfi{secrets.token_hex(2)}")
    OWNERS_DIR.mkdir(parents=True, exist_ok=True)
    owner = OWNERS_DIR / internet.prefix
    owner.write_text(str(os.getpid()))
    internet._cleanup.callback(owner.unlink, missing_ok=True)
    try:
        internet._build()
        internet._start_hosts()
    except BaseException:
        internet.close()
        raise
    return internet


def fake_internet() -> Iterator[Internet]:
    """The body of the session fixture `internet` (tests/conftest.py)."""
    internet = build()
    try:
        yield internet
    finally:
        internet.close()
