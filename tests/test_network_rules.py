"""The kernel's rules are a compilation of `NetworkPolicy.decide`: a few hundred random
destinations (address, port, protocol) go through both, and they agree on the decision
and on the rule that made it.

The kernel's side is the real ruleset of `corral.network.nftables.render`, loaded in a
scratch network namespace (this test's own: a veth pair with both ends inside it and a
default route to an address nobody holds, so nothing it sends leaves it); one packet per
destination is sent from inside (a TCP SYN, or a UDP datagram), and the named counter
that moved says which rule decided.
"""

from __future__ import annotations

import ipaddress
import json
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from corral.limits import Limits
from corral.network import nftables
from corral.network.addresses import DENIED
from corral.network.policy import NetworkPolicy, Rule
from tests.kit import internet as fake_internet

pytestmark = pytest.mark.integration

POOL = (ipaddress.ip_network("10.213.0.0/16"), ipaddress.ip_network("fd00:213::/48"))
# What the sandbox reaches on its own loopback, whatever the policy: not decided by rules.
OWN = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "::/128", "0.0.0.0/8")]
PROBES = 300
RESOLVED = ["192.0.2.10", "10.99.0.10"]
# Sends the kernel refuses before any rule sees a packet: TCP to multicast, a
# multicast address without a route, an IPv6 link-local one it cannot scope.
UNSENDABLE = ("ENETUNREACH", "EADDRNOTAVAIL", "EINVAL")

# One destination per line in, "sent" or the send's error out; each socket is closed at
# once (no retransmission can move a counter later).
SENDER = """
import errno, socket, sys
for line in sys.stdin:
    address, port, protocol = line.split()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    target = (address, int(port))
    if address.startswith("fe80:"):
        target = (address, int(port), 0, socket.if_nametoindex("d0"))
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.setblocking(False)
        try:
            if protocol == "tcp":
                s.connect(target)
            else:
                s.sendto(b"x", target)
            print("sent", flush=True)
        except BlockingIOError:
            print("sent", flush=True)
        except OSError as e:
            print(errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"""


def run(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def scratch() -> Iterator[str]:
    if (why := fake_internet.unavailable()) is not None:
        pytest.skip(why)
    name = f"crr{secrets.token_hex(3)}"
    run("ip", "netns", "add", name)
    try:
        script = "\n".join(
            [
                "link set lo up",
                "link add d0 type veth peer name d1",
                "link set d0 up",
                "link set d1 up",
                "addr add 10.213.0.2/30 dev d0",
                "addr add fd00:213::2/64 dev d0 nodad",
                "route add default via 10.213.0.1",
                "route add default via fd00:213::1",
            ]
        )
        run("ip", "-n", name, "-batch", "-", stdin=script)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def sample(rng: random.Random, policy: NetworkPolicy) -> tuple[str, int, str]:
    """A destination worth asking about: in a denied range, in an allowlist entry, in the
    documentation ranges (public here), the sandbox pool, or a resolved address."""
    networks = [e.network for e in DENIED if not any(e.network.overlaps(o) for o in OWN)]
    networks += [r.network for r in policy.allow if r.network is not None]
    networks += [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24")]
    networks += [ipaddress.ip_network(n) for n in ("2001:db8::/32", *RESOLVED)]
    networks += list(POOL)
    network = rng.choice(networks)
    if network == ipaddress.ip_network("fe80::/10"):
        network = ipaddress.ip_network("fe80::/64")  # the part an interface scope reaches
    address = (
        network[rng.randrange(network.num_addresses)] if network.num_addresses > 1 else network[0]
    )
    port = rng.choice([53, 80, 443, 8080, 8000, 8100, rng.randrange(1, 65536)])
    return str(address), port, rng.choice(["tcp", "udp"])


def counters(netns: str) -> dict[int, int]:
    listing = json.loads(run("ip", "netns", "exec", netns, "nft", "-j", "list", "counters"))
    return {
        int(item["counter"]["name"][1:]): item["counter"]["packets"]
        for item in listing["nftables"]
        if "counter" in item
    }


@pytest.mark.parametrize(
    "policy",
    [
        NetworkPolicy.parse("internet", ["10.99.0.0/24:80"]),
        NetworkPolicy.parse(
            "allowlist",
            ["allowed.test:80", "192.0.2.0/25:8000-8100", "[2001:db8::/48]", "169.254.169.254:80"],
        ),
    ],
    ids=["internet", "allowlist"],
)
def test_the_kernel_decides_as_decide_does(scratch: str, policy: NetworkPolicy) -> None:
    script = nftables.render(
        policy, resolver="127.0.0.53", also_denied=POOL, limits=Limits(connections=100_000)
    )
    resolved: dict[str, Rule] = {}
    for rule in policy.allow:
        if rule.network is None:  # as if the resolver had answered allowed.test so (the
            # private one is rebinding, which the resolver drops: the rules deny it anyway)
            script += nftables.allow_elements(rule, RESOLVED, 600, policy)
            resolved.update(dict.fromkeys(RESOLVED, rule))
    run("ip", "netns", "exec", scratch, "nft", "-f", "-", stdin=script)
    labels = nftables.labels(policy)
    sender = subprocess.Popen(
        ["ip", "netns", "exec", scratch, sys.executable, "-c", SENDER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sender.stdin is not None and sender.stdout is not None
    rng = random.Random(12)
    disagree = []
    unsendable = 0
    try:
        before = counters(scratch)
        chosen = [(a, p, t) for a in RESOLVED for p in (80, 443) for t in ("tcp", "udp")]
        for address, port, protocol in chosen + [sample(rng, policy) for _ in range(PROBES)]:
            sender.stdin.write(f"{address} {port} {protocol}\n")
            sender.stdin.flush()
            sent = sender.stdout.readline().strip()
            after = counters(scratch)
            moved = [n for n, packets in after.items() if packets != before.get(n, 0)]
            before = after
            rules = [resolved[address]] if address in resolved else []
            want = policy.decide(address, port, protocol, rules, POOL)
            got = [(labels[n].allowed, labels[n].rule) for n in moved]
            if sent in UNSENDABLE and not moved and not want.allowed:
                unsendable += 1  # the kernel refused it before any rule: denied too
            elif got != [(want.allowed, want.rule)]:
                disagree.append((address, port, protocol, sent, want, got))
    finally:
        sender.stdin.close()
        sender.stdout.close()
        sender.wait(10)
    assert disagree == []
    assert unsendable < PROBES // 5  # the comparison saw most of them
