"""Sandboxes with a network, in the fake internet: what each policy reaches, proved by
what the fake hosts saw (not only by the client's error), and what is left after a
sandbox is destroyed or its owner killed.

The engine runs in a driver process inside the fake internet's gateway namespace
(tests/kit/netdriver.py): the sandboxes' uplinks hang off the gateway, whose only routes
lead into the fake internet.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from corral.isolation import microvm_net, netns
from corral.network import nftables
from corral.network.addresses import DENIED
from corral.network.policy import NetworkPolicy
from tests.conftest import every_tier, holds_slot
from tests.kit import internet as fake
from tests.kit import processes
from tests.kit.internet import Internet
from tests.kit.netdriver import Driver
from tests.kit.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.sandbox]

LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")

# Run in the sandbox: each probe [kind, address, port, path] -> "ok:<answer>" or "err:<why>".
PROBE = r"""
import errno, json, socket, sys
for kind, address, port, path in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        if kind == "http":
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect((address, port))
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: probe\r\n\r\n".encode())
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            print("ok:" + reply.decode().split("\r\n\r\n", 1)[1].strip())
        else:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(path.encode(), (address, port))
                print("ok:" + s.recvfrom(512)[0].decode())
    except TimeoutError:
        print("err:timeout")
    except OSError as e:
        print("err:" + errno.errorcode.get(e.errno or 0, str(e)))
"""


@pytest.fixture(scope="module")
def driver(internet: Internet, settings: Settings) -> Iterator[Driver]:
    if netns.tools_missing():
        pytest.skip(f"sandbox networks need {', '.join(netns.tools_missing())}")
    driver = Driver.in_gateway(internet.netns(fake.GATEWAY), settings)
    yield driver
    driver.close()


def create(
    driver: Driver,
    network: str,
    allow: list[str] | None = None,
    isolation: str | None = None,
    **limits: Any,
) -> str:
    """A sandbox of `driver` with that network, on `isolation` (the default tier if None)."""
    asked = {"network": network, "allow": allow or [], "limits": limits, "isolation": isolation}
    return str(driver.ok(op="create", **asked)["id"])


def probe(driver: Driver, sandbox: str, probes: list[tuple[str, str, int, str]]) -> list[str]:
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", PROBE, json.dumps(probes)])
    assert done["exit_code"] == 0, done
    lines: list[str] = done["stdout"].splitlines()
    return lines


def token() -> str:
    return "/" + secrets.token_hex(6)


@every_tier
@pytest.mark.fails_on("gvisor", reason="network none answers EHOSTUNREACH, not ENETUNREACH")
def test_none_reaches_nothing(driver: Driver, internet: Internet, tier: str) -> None:
    sandbox = create(driver, "none", isolation=tier)
    path = token()
    got = probe(
        driver, sandbox, [("http", fake.ALLOWED_V4, 80, path), ("http", fake.ALLOWED_V6, 80, path)]
    )
    assert got == ["err:ENETUNREACH", "err:ENETUNREACH"]
    driver.ok(op="destroy", id=sandbox)
    assert internet.saw(path=path) == []


@every_tier
@pytest.mark.microvm_subset
def test_internet_reaches_public_hosts_only(driver: Driver, internet: Internet, tier: str) -> None:
    sandbox = create(driver, "internet", isolation=tier)
    path = token()
    probes = [
        ("http", fake.ALLOWED_V4, 80, path),
        ("http", fake.ALLOWED_V6, 8080, path),
        ("http", fake.PRIVATE_V4, 80, path),
        ("http", fake.METADATA_V4, 80, path),
        # IPv4-mapped IPv6 literals: the kernel sends them as IPv4, where deny4 decides
        ("http", f"::ffff:{fake.PRIVATE_V4}", 80, path),
        ("http", f"::ffff:{fake.METADATA_V4}", 80, path),
        ("http", f"::ffff:{fake.DENIED_V4}", 80, path),
        ("udp", fake.ALLOWED_V4, 7, path),
        ("udp", fake.ALLOWED_V6, 7, path),
    ]
    got = probe(driver, sandbox, probes)
    driver.ok(op="destroy", id=sandbox)
    assert got == [
        "ok:allowed.test",
        "ok:allowed.test",
        "err:ECONNREFUSED",
        "err:ECONNREFUSED",
        "err:ECONNREFUSED",
        "err:ECONNREFUSED",
        "ok:denied.test",
        f"ok:{path}",
        f"ok:{path}",
    ]
    seen = {(e["address"], e["port"]) for e in internet.saw(service="http", path=path)}
    assert seen == {(fake.ALLOWED_V4, 80), (fake.ALLOWED_V6, 8080), (fake.DENIED_V4, 80)}
    # Every request left through the gateway's NAT: the hosts saw the gateway, not the pool.
    assert {e["client"] for e in internet.saw(path=path)} <= set(fake.GATEWAY_ADDRESSES)


def test_dns_goes_nowhere_but_the_sandbox_resolver(driver: Driver, internet: Internet) -> None:
    # Even an allowlist naming the DNS servers' networks does not open port 53.
    sandbox = create(driver, "internet", ["203.0.113.0/24", "198.51.100.0/24"])
    name = f"q{secrets.token_hex(4)}.allowed.test"
    query = textwrap.dedent("""
        import socket, struct, sys
        labels = b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[1].split("."))
        header = struct.pack(">HHHHHH", 7, 0x100, 1, 0, 0, 0)
        q = header + labels + b"\\0" + struct.pack(">HH", 1, 1)
        for server in sys.argv[2:]:
            family = socket.AF_INET6 if ":" in server else socket.AF_INET
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(family, kind) as s:
                    s.settimeout(3)
                    try:
                        if kind == socket.SOCK_DGRAM:
                            s.sendto(q, (server, 53))
                        else:
                            s.connect((server, 53))
                            s.sendall(struct.pack(">H", len(q)) + q)
                        s.recv(512)
                        print("answered")
                    except OSError as e:
                        print(type(e).__name__)
    """)
    servers = [fake.DNS_V4, fake.DNS_V6, fake.OTHER_DNS_V4]
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", query, name, *servers])
    driver.ok(op="destroy", id=sandbox)
    assert done["stdout"].split() == ["PermissionError", "ConnectionRefusedError"] * 3, done
    assert [e for e in internet.saw(service="dns") if name in e.get("question", "")] == []
    # The same queries from the gateway are answered: the probe itself works.
    control = internet.run(fake.GATEWAY, [sys.executable, "-c", query, name, fake.DNS_V4])
    assert control.stdout.split() == ["answered", "answered"], control.stderr


@every_tier
def test_an_allowlist_of_cidrs_is_exact_ports_too(
    driver: Driver, internet: Internet, tier: str
) -> None:
    allow = [f"{fake.ALLOWED_V4}/32:8080", "[2001:db8::20]"]
    sandbox = create(driver, "allowlist", allow, isolation=tier)
    path = token()
    probes = [
        ("http", fake.ALLOWED_V4, 8080, path),  # listed with its port
        ("http", fake.ALLOWED_V4, 80, path),  # another port
        ("http", f"::ffff:{fake.ALLOWED_V4}", 8080, path),  # the same, IPv4-mapped
        ("http", fake.ALLOWED_V6, 8080, path),  # not listed
        ("http", fake.DENIED_V6, 80, path),  # listed, every port
        ("http", fake.DENIED_V4, 80, path),  # the same host by IPv4: not listed
        ("udp", fake.ALLOWED_V4, 7, path),  # UDP: the entry names port 8080 only
        ("http", fake.METADATA_V4, 80, path),
    ]
    got = probe(driver, sandbox, probes)
    driver.ok(op="destroy", id=sandbox)
    assert got == [
        "ok:allowed.test",
        "err:ECONNREFUSED",
        "ok:allowed.test",
        "err:ECONNREFUSED",
        "ok:denied.test",
        "err:ECONNREFUSED",
        # UDP: the send itself fails, at once; a microVM's guest gets an ICMP error from
        # the host instead, which its unconnected socket does not report.
        "err:timeout" if tier == "microvm" else "err:EPERM",
        "err:ECONNREFUSED",
    ]
    seen = {(e["address"], e["port"]) for e in internet.saw(path=path)}
    assert seen == {(fake.ALLOWED_V4, 8080), (fake.DENIED_V6, 80)}


def test_a_private_range_is_reached_only_when_named(driver: Driver, internet: Internet) -> None:
    sandbox = create(driver, "internet", [f"{fake.PRIVATE_V4}/32:80"])
    path = token()
    got = probe(
        driver,
        sandbox,
        [("http", fake.PRIVATE_V4, 80, path), ("http", fake.METADATA_V4, 80, path)],
    )
    driver.ok(op="destroy", id=sandbox)
    assert got == ["ok:private.test", "err:ECONNREFUSED"]
    assert [e["address"] for e in internet.saw(path=path)] == [fake.PRIVATE_V4]


@pytest.fixture
def gateway_listener(internet: Internet) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A TCP listener on every address of the gateway (the sandboxes' host), its loopback
    included, that prints the peer of every connection it accepts."""
    port = 20000 + secrets.randbelow(20000)
    code = textwrap.dedent("""
        import socket, sys
        s = socket.create_server(
            ("::", int(sys.argv[1])), family=socket.AF_INET6, dualstack_ipv6=True
        )
        print("listening", flush=True)
        while True:
            c, peer = s.accept()
            print("accepted", peer[0], flush=True)
            c.close()
    """)
    argv = ["nsenter", f"--net=/run/netns/{internet.netns(fake.GATEWAY)}", "--"]
    listener = processes.spawn(
        [*argv, sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert listener.stdout is not None and listener.stdout.readline() == "listening\n"
    yield listener, port
    processes.stop(listener)


@every_tier
def test_internet_does_not_reach_the_host_nor_another_sandbox(
    driver: Driver, gateway_listener: tuple[subprocess.Popen[str], int], tier: str
) -> None:
    listener, port = gateway_listener
    # Even with the sandbox pool on its allowlist: the host keeps sandboxes apart.
    a = create(driver, "internet", [str(netns.POOL4), f"[{netns.POOL6}]"], tier)
    b = create(driver, "internet", isolation=tier)
    b_record = driver.ok(op="footprint", id=b)
    b_addresses = netns.Addresses(b_record["net_slot"])
    host = netns.Addresses(driver.ok(op="footprint", id=a)["net_slot"])
    serve_once = (
        "import socket\n"
        "s = socket.create_server(('::', 8000), family=socket.AF_INET6, dualstack_ipv6=True)\n"
        "s.settimeout(8)\n"
        "try:\n    s.accept(); print('accepted')\nexcept TimeoutError:\n    print('nobody')\n"
    )
    driver.ok(op="spawn", id=b, key="b", argv=["python3", "-c", serve_once])
    probes = [
        ("http", fake.GATEWAY_V4, port, "/"),
        ("http", fake.GATEWAY_V6, port, "/"),
        ("http", str(host.host4), port, "/"),
        ("http", str(host.host6), port, "/"),
        ("http", "127.0.0.1", port, "/"),  # its own loopback: the host's is not there
        ("http", str(b_addresses.sandbox4), 8000, "/"),
        ("http", str(b_addresses.sandbox6), 8000, "/"),
        # A microVM's gateway: its sandbox's own namespace, which answers DNS only.
        ("http", str(microvm_net.GATEWAY4), port, "/"),
        ("http", str(microvm_net.GATEWAY6), port, "/"),
    ]
    got = probe(driver, a, probes)
    assert driver.ok(op="collect", key="b")["stdout"].strip() == "nobody"
    for sandbox in (a, b):
        driver.ok(op="destroy", id=sandbox)
    assert got[:5] == ["err:ECONNREFUSED"] * 5
    assert all(result in ("err:timeout", "err:ECONNREFUSED") for result in got[5:]), got
    listener.send_signal(signal.SIGTERM)
    out, _ = listener.communicate(timeout=10)
    assert "accepted" not in out


def test_a_policy_change_hits_new_connections_only(driver: Driver, internet: Internet) -> None:
    sandbox = create(driver, "internet")
    first, second, third = token(), token(), token()
    # One keep-alive connection before the change, a request on it after, then a new one.
    code = (
        "import os, socket, sys, time\n"
        "def get(s, path):\n"
        "    s.sendall(f'GET {path} HTTP/1.1\\r\\nHost: probe\\r\\n\\r\\n'.encode())\n"
        "    f = s.makefile('rb')\n"
        "    length = 0\n"
        "    while (line := f.readline()) not in (b'\\r\\n', b''):\n"
        "        if line.lower().startswith(b'content-length:'): length = int(line.split()[1])\n"
        "    return f.read(length).decode().strip()\n"
        "s = socket.create_connection(('192.0.2.10', 80), timeout=5)\n"
        "print(get(s, sys.argv[1]))\n"
        "open('/tmp/ready', 'w').close()\n"
        "while not os.path.exists('/tmp/go'): time.sleep(0.05)\n"
        "print(get(s, sys.argv[2]))\n"
        "try:\n"
        "    print(get(socket.create_connection(('192.0.2.10', 80), timeout=5), sys.argv[3]))\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    driver.ok(op="spawn", id=sandbox, key="c", argv=["python3", "-c", code, first, second, third])
    wait_until(
        lambda: (
            driver.ok(op="run", id=sandbox, argv=["test", "-e", "/tmp/ready"])["exit_code"] == 0
        ),
        "the first connection",
    )
    driver.ok(op="set_network", id=sandbox, network="allowlist", allow=[f"{fake.DENIED_V4}/32"])
    driver.ok(op="run", id=sandbox, argv=["touch", "/tmp/go"])
    out = driver.ok(op="collect", key="c")
    assert out["stdout"].split() == [
        "allowed.test",
        "allowed.test",
        "ConnectionRefusedError",
    ], out
    assert internet.saw(path=second) and not internet.saw(path=third)
    # The new policy's own entries work at once, and a switch to none closes everything.
    assert probe(driver, sandbox, [("http", fake.DENIED_V4, 80, third)]) == ["ok:denied.test"]
    driver.ok(op="set_network", id=sandbox, network="none")
    assert probe(driver, sandbox, [("http", fake.DENIED_V4, 80, third)]) == ["err:ECONNREFUSED"]
    driver.ok(op="set_network", id=sandbox, network="internet")
    assert probe(driver, sandbox, [("http", fake.ALLOWED_V4, 80, third)]) == ["ok:allowed.test"]
    driver.ok(op="destroy", id=sandbox)


def test_a_sandbox_made_without_a_network_cannot_gain_one(driver: Driver) -> None:
    sandbox = create(driver, "none")
    refused = driver.call(op="set_network", id=sandbox, network="internet")
    driver.ok(op="destroy", id=sandbox)
    assert refused["error"] == "IsolationUnavailable"
    assert "create a new sandbox with network 'internet' or 'allowlist'" in refused["message"]


def test_the_connection_cap_refuses_the_next_connection(driver: Driver) -> None:
    sandbox = create(driver, "internet", connections=3)
    code = (
        "import socket\n"
        "held = [socket.create_connection(('192.0.2.10', 80), timeout=5) for _ in range(3)]\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.10', 80), timeout=5); print('fourth connected')\n"
        "except OSError as e:\n"
        "    print('fourth', type(e).__name__)\n"
        "held.pop().close()\n"
        "import time; time.sleep(0.5)\n"
        "socket.create_connection(('192.0.2.10', 80), timeout=5); print('again connected')\n"
    )
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", code])
    driver.ok(op="destroy", id=sandbox)
    assert done["stdout"].splitlines() == ["fourth ConnectionRefusedError", "again connected"], done


def test_the_bandwidth_cap_slows_a_download(driver: Driver) -> None:
    # 2 MB at 8 Mbit/s (1 MB/s) takes about 2 s; uncapped it takes milliseconds. A wide
    # margin: this checks that a cap is applied, not how exact it is.
    code = (
        "import time, urllib.request as u\n"
        "start = time.monotonic()\n"
        "size = len(u.urlopen('http://192.0.2.10/bytes/2000000', timeout=30).read())\n"
        "print(size, time.monotonic() - start)\n"
    )
    capped = create(driver, "internet", bandwidth_mbit=8)
    size, seconds = driver.ok(op="run", id=capped, argv=["python3", "-c", code])["stdout"].split()
    record = driver.ok(op="footprint", id=capped)
    # Uploads are shaped on the sandbox's side of the link the same way (not timed here).
    inside = subprocess.run(
        ["nsenter", f"--net={record['netns']}", "--", "tc", "qdisc", "show", "dev", "eth0"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    driver.ok(op="destroy", id=capped)
    assert int(size) == 2_000_000
    assert float(seconds) >= 1.5
    assert "tbf" in inside and "rate 8Mbit" in inside


def links_in(namespace: str) -> str:
    return fake.ip("-o", "link", "show", netns=namespace)


def left_behind(record: dict[str, Any], gateway: str) -> list[str]:
    found = []
    if record["veth"] in links_in(gateway):
        found.append(f"veth {record['veth']}")
    if record["netns"] in Path("/proc/self/mountinfo").read_text():
        found.append(f"netns mount {record['netns']}")
    if Path(record["netns"]).exists():
        found.append(f"netns file {record['netns']}")
    if holds_slot(record, "net"):
        found.append(f"address slot {record['net_slot']}")
    return found


def test_destroy_leaves_nothing(driver: Driver, internet: Internet) -> None:
    sandbox = create(driver, "internet", bandwidth_mbit=100)
    record = driver.ok(op="footprint", id=sandbox)
    gateway = internet.netns(fake.GATEWAY)
    assert left_behind(record, gateway) == [
        f"veth {record['veth']}",
        f"netns mount {record['netns']}",
        f"netns file {record['netns']}",
        f"address slot {record['net_slot']}",
    ]
    driver.ok(op="destroy", id=sandbox)
    assert left_behind(record, gateway) == []


def test_the_reaper_removes_the_network_of_a_killed_owner(
    internet: Internet, settings: Settings, driver: Driver
) -> None:
    gateway = internet.netns(fake.GATEWAY)
    doomed = Driver.in_gateway(gateway, settings)
    sandbox = create(doomed, "allowlist", [f"{fake.ALLOWED_V4}/32"])
    record = doomed.ok(op="footprint", id=sandbox)
    doomed.process.kill()
    doomed.process.wait()
    assert record["veth"] in links_in(gateway)
    # Any later engine of the runtime dir reaps it (here: a new one, at its start).
    Driver.in_gateway(gateway, settings).close()
    assert left_behind(record, gateway) == []


def counters(netns_path: str, policy: NetworkPolicy) -> dict[str, int]:
    """The packets each label's named counter holds in the sandbox's namespace."""
    done = subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", "nft", "-j", "list", "counters"],
        capture_output=True,
        text=True,
        check=True,
    )
    found = nftables.labels(policy)
    return {
        found[int(item["counter"]["name"][1:])].rule: item["counter"]["packets"]
        for item in json.loads(done.stdout)["nftables"]
        if "counter" in item and item["counter"]["packets"]
    }


def test_every_decision_is_counted_exactly_a_flood_too(driver: Driver) -> None:
    policy = NetworkPolicy.parse("internet")
    sandbox = create(driver, "internet")
    path = driver.ok(op="footprint", id=sandbox)["netns"]
    flood = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "refused = 0\n"
        "for _ in range(300):\n"
        "    try: s.sendto(b'x', ('169.254.169.254', 7))\n"
        "    except PermissionError: refused += 1\n"
        "print(refused)\n"
    )
    assert driver.ok(op="run", id=sandbox, argv=["python3", "-c", flood])["stdout"].strip() == "300"
    path_ = token()
    assert probe(driver, sandbox, [("http", fake.ALLOWED_V4, 80, path_)]) == ["ok:allowed.test"]
    counted = counters(path, policy)
    driver.ok(op="destroy", id=sandbox)
    metadata = next(e.reason for e in DENIED if e.network.overlaps(LINK_LOCAL))
    # 300 refusals, however few log lines the rate limit let through; one new connection.
    assert counted == {metadata: 300, "internet": 1}


def test_resolved_addresses_open_only_their_rule_ports(driver: Driver, internet: Internet) -> None:
    # What the sandbox's resolver does before it answers a name the allowlist names.
    sandbox = create(driver, "allowlist", ["allowed.test:80"])
    before, after = token(), token()
    assert probe(driver, sandbox, [("http", fake.ALLOWED_V4, 80, before)]) == ["err:ECONNREFUSED"]
    driver.ok(
        op="allow",
        id=sandbox,
        rule="allowed.test:80",
        addresses=[fake.ALLOWED_V4, fake.ALLOWED_V6, fake.PRIVATE_V4],  # the last: rebinding
        ttl=5,
    )
    got = probe(
        driver,
        sandbox,
        [
            ("http", fake.ALLOWED_V4, 80, after),
            ("http", fake.ALLOWED_V6, 80, after),
            ("http", fake.ALLOWED_V4, 8080, after),
            ("http", fake.PRIVATE_V4, 80, after),
            ("http", fake.DENIED_V4, 80, after),
        ],
    )
    driver.ok(op="destroy", id=sandbox)
    assert got == ["ok:allowed.test", "ok:allowed.test"] + ["err:ECONNREFUSED"] * 3
    assert internet.saw(path=before) == []
    assert {e["address"] for e in internet.saw(path=after)} == {fake.ALLOWED_V4, fake.ALLOWED_V6}


@every_tier
@pytest.mark.microvm_subset  # the guest's DNS takes a way of its own (microvm_net)
def test_names_resolve_through_the_sandbox_resolver(
    driver: Driver, internet: Internet, tier: str
) -> None:
    sandbox = create(driver, "allowlist", ["allowed.test:80", "*.allowed.test:8080"], tier)
    path = token()
    code = textwrap.dedent("""
        import socket, sys, urllib.request as u
        for url in sys.argv[2:]:
            try:
                print(u.urlopen(url + sys.argv[1], timeout=5).read().decode().strip())
            except OSError as e:
                reason = getattr(e, "reason", e)
                print(type(reason).__name__)
    """)
    urls = [
        "http://allowed.test",  # listed, port 80
        "http://allowed.test:8080",  # listed on 80 only
        "http://www.allowed.test:8080",  # the wildcard, on its port
        "http://denied.test",  # not listed: NXDOMAIN
        f"http://{fake.DENIED_V4}",  # by address: nothing resolved it
        "http://rebind.test",  # not listed either
    ]

    def asked_for_denied() -> list[str]:  # the fake DNS's log is the session's: compare counts
        return [
            e["question"] for e in internet.saw(service="dns") if "denied.test" in e["question"]
        ]

    before = asked_for_denied()
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", code, path, *urls])
    driver.ok(op="destroy", id=sandbox)
    assert done["stdout"].split() == [
        "allowed.test",
        "ConnectionRefusedError",
        "allowed.test",
        "gaierror",
        "ConnectionRefusedError",
        "gaierror",
    ], done
    assert {(e["address"], e["port"]) for e in internet.saw(path=path)} <= {
        (fake.ALLOWED_V4, 80),
        (fake.ALLOWED_V6, 80),
        (fake.ALLOWED_V4, 8080),
        (fake.ALLOWED_V6, 8080),
    }
    assert asked_for_denied() == before  # a name off the list never leaves the host


def test_dns_rebinding_fails_under_internet(driver: Driver, internet: Internet) -> None:
    sandbox = create(driver, "internet")
    code = (
        "import socket\n"
        "for name in ('allowed.test', 'rebind.test', 'metadata.test'):\n"
        "    try: print(name, sorted({a[4][0] for a in socket.getaddrinfo(name, 80)}))\n"
        "    except socket.gaierror: print(name, 'none')\n"
    )
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", code])
    driver.ok(op="destroy", id=sandbox)
    assert done["stdout"].splitlines() == [
        f"allowed.test {sorted([fake.ALLOWED_V4, fake.ALLOWED_V6])}",
        "rebind.test none",
        "metadata.test none",
    ], done


def test_connections_are_events_and_a_flood_keeps_its_count(driver: Driver) -> None:
    sandbox = create(driver, "internet")
    code = textwrap.dedent("""
        import socket, urllib.request as u
        print(u.urlopen("http://allowed.test/", timeout=5).read().decode().strip())
        try:
            socket.create_connection(("169.254.169.254", 80), timeout=5)
        except OSError as e:
            print(type(e).__name__)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(300):
            try:
                s.sendto(b"x", ("169.254.169.254", 7))
            except PermissionError:
                pass
    """)
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", code])
    assert done["stdout"].split() == ["allowed.test", "ConnectionRefusedError"], done
    driver.ok(op="destroy", id=sandbox)  # the last count is taken as it ends
    events = driver.ok(op="events", id=sandbox)
    metadata = next(e.reason for e in DENIED if e.network.overlaps(LINK_LOCAL))

    def having(**match: Any) -> list[dict[str, Any]]:
        return [e for e in events if all(e[k] == v for k, v in match.items())]

    assert having(kind="dns", decision="allowed", name="allowed.test")
    assert having(
        kind="connect", decision="allowed", rule="internet", protocol="tcp",
        address=fake.ALLOWED_V4, port=80,
    )  # fmt: skip
    assert having(
        kind="connect", decision="denied", rule=metadata, protocol="tcp",
        address=fake.METADATA_V4, port=80,
    )  # fmt: skip
    # 301 refusals: some one by one, the rest (the kernel's log is rate limited) summed.
    one_by_one = having(kind="connect", decision="denied", rule=metadata)
    summed = having(kind="suppressed", decision="denied", rule=metadata)
    assert summed, "a flood of 300 was logged one by one"
    assert len(one_by_one) + sum(e["count"] for e in summed) == 301


def test_without_a_usable_tun_device_a_rootless_tier_offers_none_only() -> None:
    # Rootless uplinks are slirp4netns's, which needs /dev/net/tun: a server that may not
    # open it must refuse internet and allowlist rather than pretend, and say why.
    # (tests/test_network_rootless.py runs the rootless uplink with a usable one.)
    if os.stat("/dev/net/tun").st_mode & 0o006 == 0o006:
        pytest.skip("this host's /dev/net/tun is usable by every user")
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from corral.config import Settings
        from corral.isolation.namespace import NamespaceBackend
        backend = NamespaceBackend(Settings(runtime_dir=Path(sys.argv[1])))
        print(sorted(backend.network_modes()))
        print(NamespaceBackend.probe(backend.settings).details["network_needs"])
    """)
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         code, "/nonexistent"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    modes, needs = done.stdout.splitlines()
    assert modes == "['none']"
    assert needs.startswith("/dev/net/tun usable by this user"), needs


def test_a_policy_change_drops_what_the_old_names_opened(driver: Driver) -> None:
    sandbox = create(driver, "allowlist", ["allowed.test:80"])
    driver.ok(op="allow", id=sandbox, rule="allowed.test:80", addresses=[fake.ALLOWED_V4])
    path = token()
    assert probe(driver, sandbox, [("http", fake.ALLOWED_V4, 80, path)]) == ["ok:allowed.test"]
    driver.ok(op="set_network", id=sandbox, network="allowlist", allow=["denied.test:80"])
    # The address allowed.test resolved to is not the new list's, even before it expires.
    assert probe(driver, sandbox, [("http", fake.ALLOWED_V4, 80, path)]) == ["err:ECONNREFUSED"]
    driver.ok(op="destroy", id=sandbox)
