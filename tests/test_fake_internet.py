"""The fake internet the network tests stand on (tests/kit/internet.py) does what it says:
its hosts answer by address and by name, over IPv4 and IPv6, and nothing routes out of it.

Every probe runs in a client namespace attached to the gateway, the way a sandbox's uplink
will be; the fake hosts' own request log proves which host a request reached.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from tests.kit import internet as fake
from tests.kit.internet import Client, Internet
from tests.kit.polling import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(internet: Internet) -> Client:
    return internet.attach("self")


def python_in(internet: Internet, client: Client, code: str) -> str:
    """Run Python `code` (with this venv's libraries) in `client`; its stdout, stripped."""
    done = internet.run(client.name, [sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def http_get(internet: Internet, client: Client, url: str) -> str:
    code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).read().decode())"
    return python_in(internet, client, code)


@pytest.mark.parametrize("address", list(fake.HTTP_HOSTS))
@pytest.mark.parametrize("port", [80, 8080])
def test_every_host_answers_by_address(
    internet: Internet, client: Client, address: str, port: int
) -> None:
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    assert http_get(internet, client, f"http://{host}:{port}/") == fake.HTTP_HOSTS[address]
    assert internet.wait_for(service="http", address=address, port=port, path="/")


def test_names_resolve_through_the_fake_dns_v4_and_v6(internet: Internet, client: Client) -> None:
    # getaddrinfo as any program calls it: /etc/resolv.conf is the fake DNS (ip netns exec).
    code = (
        "import socket\n"
        "for name in ('allowed.test', 'www.allowed.test', 'denied.test', 'rebind.test'):\n"
        "    print(name, sorted({a[4][0] for a in socket.getaddrinfo(name, 80)}))\n"
        "try:\n"
        "    socket.getaddrinfo('nowhere.test', 80)\n"
        "except socket.gaierror as e:\n"
        "    print('nowhere.test', e.errno == socket.EAI_NONAME)\n"
    )
    assert python_in(internet, client, code).splitlines() == [
        f"allowed.test {sorted([fake.ALLOWED_V4, fake.ALLOWED_V6])}",
        f"www.allowed.test {sorted([fake.ALLOWED_V4, fake.ALLOWED_V6])}",
        f"denied.test {sorted([fake.DENIED_V4, fake.DENIED_V6])}",
        f"rebind.test {[fake.PRIVATE_V4]}",
        "nowhere.test True",
    ]
    assert http_get(internet, client, "http://allowed.test:8080/") == "allowed.test"
    assert http_get(internet, client, "http://denied.test/") == "denied.test"
    assert internet.wait_for(service="dns", client=client.v4, question="allowed.test. IN A")


def test_dns_answers_over_tcp_and_udp_at_every_resolver(internet: Internet, client: Client) -> None:
    # The raw queries hostile code will try (another resolver, DNS over TCP) must work here,
    # or a test that sees them fail in a sandbox would prove nothing.
    code = (
        "import dns.message, dns.query\n"
        f"for server in {list(fake.DNS_SERVERS)!r}:\n"
        "    for query in (dns.query.udp, dns.query.tcp):\n"
        "        reply = query(dns.message.make_query('allowed.test', 'A'), server, timeout=10)\n"
        "        print(server, query.__name__, reply.answer[0][0].address)\n"
    )
    lines = python_in(internet, client, code).splitlines()
    assert lines == [
        f"{server} {transport} {fake.ALLOWED_V4}"
        for server in fake.DNS_SERVERS
        for transport in ("udp", "tcp")
    ]
    assert internet.wait_for(service="dns", transport="tcp", address=fake.OTHER_DNS_V4)


def test_udp_echo_v4_and_v6(internet: Internet, client: Client) -> None:
    code = (
        "import socket\n"
        f"for family, address in ((socket.AF_INET, {fake.ALLOWED_V4!r}),"
        f" (socket.AF_INET6, {fake.ALLOWED_V6!r})):\n"
        "    with socket.socket(family, socket.SOCK_DGRAM) as s:\n"
        "        s.settimeout(10)\n"
        "        s.sendto(b'ping', (address, 7))\n"
        "        print(s.recvfrom(64)[0].decode())\n"
    )
    assert python_in(internet, client, code).splitlines() == ["ping", "ping"]


def test_no_namespace_has_a_route_out(internet: Internet, client: Client) -> None:
    names = internet.namespaces()
    assert {internet.netns(fake.GATEWAY), internet.netns(fake.INTERNET), client.netns} <= set(names)
    for netns in names:
        assert fake.escape_routes(netns) == [], f"{netns} routes out of the fake internet"
        for lookup in ("192.88.99.1", "2001:4860::1"):
            # A route lookup (no packet is sent) for an address outside: unreachable.
            with pytest.raises(RuntimeError, match="unreachable"):
                fake.ip("route", "get", lookup, netns=netns)


def test_the_gateway_reaches_the_hosts_by_name(internet: Internet) -> None:
    # Where the server and the sandboxes' uplinks (veth, pasta, slirp4netns) will run.
    code = "import urllib.request as u; print(u.urlopen('http://allowed.test/', timeout=10).read())"
    done = internet.run(fake.GATEWAY, [sys.executable, "-c", code])
    assert (done.returncode, done.stdout) == (0, "b'allowed.test\\n'\n"), done.stderr
    wait_until(
        lambda: [r for r in internet.saw(service="http") if r["client"] in fake.GATEWAY_ADDRESSES],
        "a request from the gateway",
    )


def test_close_leaves_nothing_behind_even_after_a_failure_half_way() -> None:
    if reason := fake.unavailable():
        pytest.skip(reason)
    other = fake.build()
    try:
        other.attach("c1")
        # A name too long for a veth fails after its namespace exists: a half-built client.
        with pytest.raises(RuntimeError, match="link add"):
            other.attach("toolongname")
        assert other.netns("toolongname") in other.namespaces()
    finally:
        other.close()
    assert other.namespaces() == []
    links = fake.ip("-o", "link", "show")
    assert other.prefix not in links
    assert not any(fake.NETNS_DIR.glob(f"{other.prefix}-*"))
    assert not (fake.OWNERS_DIR / other.prefix).exists()


def test_the_route_check_sees_a_way_out() -> None:
    """`escape_routes` is what proves there is no way out: it must see one when there is."""
    if reason := fake.unavailable():
        pytest.skip(reason)
    other = fake.build()
    try:
        gateway = other.netns(fake.GATEWAY)
        assert fake.escape_routes(gateway) == []
        fake.ip("route", "add", "default", "via", fake.ALLOWED_V4, netns=gateway)
        fake.ip("-6", "route", "add", "2001:4860::/32", "via", fake.ALLOWED_V6, netns=gateway)
        escapes = fake.escape_routes(gateway)
        assert [line.split()[0] for line in escapes] == ["default", "2001:4860::/32"], escapes
    finally:
        other.close()


def test_a_killed_session_is_swept_by_the_next() -> None:
    if reason := fake.unavailable():
        pytest.skip(reason)
    other = fake.build()
    try:
        other.attach("c1")
        # As if its session had been SIGKILLed: its owner is a pid that has exited.
        gone = subprocess.Popen(["true"])
        gone.wait()
        (fake.OWNERS_DIR / other.prefix).write_text(str(gone.pid))
        assert other.prefix in fake.sweep()
        assert other.namespaces() == []
        assert not any(fake.NETNS_DIR.glob(f"{other.prefix}-*"))
    finally:
        other.close()  # after a sweep: nothing left to do, and no error
