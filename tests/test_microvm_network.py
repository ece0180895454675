"""A microVM guest's network (`corral.isolation.microvm_net`), from the hostile side.

The guest has a kernel of its own, and root in it can set any address and MAC on its
network device: the rules that hold it are the host's, in the sandbox's namespace. Root
in the guest claims another sandbox's address, or changes its MAC: nothing of
it gets out, and the guest is back once it puts its own address back. The host reaches
a guest's port as it reaches a namespace sandbox's (the port proxy's
`Sandbox.open_port`, through the guest agent), and never a port of the host's own
instead; the server's port proxy serves a guest's web app. A sandbox with a
network refuses a memory snapshot, saying why, before anything changes.

All in the fake internet (tests/kit/internet.py), with one shared guest: a TCG boot is
seconds.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest

from corral import Sandbox
from corral.config import Settings
from corral.isolation import microvm_net, netns
from tests.conftest import LiveServer, opts, server_template, tier_unavailable
from tests.kit import internet as fake
from tests.kit import processes, webapp
from tests.kit.debian import needs_archive
from tests.kit.internet import Internet
from tests.kit.netdriver import Driver
from tests.kit.polling import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.sandbox,
    pytest.mark.hostile,
    *needs_archive("python3"),
]

BUSYBOX_IP = "/.corral/busybox ip"
# A datagram of a size of its own (the fake internet logs its size even when no answer
# can come back: a packet with a forged source gets there, if anything lets it out),
# then a request.
FETCH = (
    "import socket, sys, urllib.request as u\n"
    "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x' * int(sys.argv[3]), "
    "(sys.argv[1], 7))\n"
    "try: print(u.urlopen(f'http://{sys.argv[1]}{sys.argv[2]}', timeout=3).read().decode())\n"
    "except OSError as e: print(type(e).__name__)\n"
)


@pytest.fixture(scope="module")
def driver(internet: Internet, settings: Settings) -> Iterator[Driver]:
    if reason := tier_unavailable("microvm", settings):
        pytest.skip(f"microvm tier unavailable here: {reason}")
    if netns.tools_missing():
        pytest.skip(f"sandbox networks need {', '.join(netns.tools_missing())}")
    driver = Driver.in_gateway(internet.netns(fake.GATEWAY), settings)
    yield driver
    driver.close()


@pytest.fixture(scope="module")
def guest(driver: Driver) -> Iterator[str]:
    """One microVM with network internet, shared (each test leaves it as it found it)."""
    sandbox = str(driver.ok(op="create", network="internet", isolation="microvm")["id"])
    yield sandbox
    driver.ok(op="destroy", id=sandbox)


def as_root(driver: Driver, sandbox: str, script: str) -> None:
    done = driver.ok(op="run", id=sandbox, argv=["sh", "-c", script], user="root")
    assert done["exit_code"] == 0, done


def fetch(driver: Driver, sandbox: str) -> tuple[str, int]:
    """What the guest got for a fresh path of the allowed host, and the size of the
    datagram it sent first (unique enough: no other test sends one that large)."""
    size = 600 + secrets.randbelow(800)
    argv = ["python3", "-c", FETCH, fake.ALLOWED_V4, "/" + secrets.token_hex(6), str(size)]
    return str(driver.ok(op="run", id=sandbox, argv=argv)["stdout"]).strip(), size


def test_root_in_the_guest_cannot_spoof_an_address_or_a_mac_to_get_out(
    driver: Driver, guest: str, internet: Internet
) -> None:
    ip = BUSYBOX_IP
    own = (
        f"{ip} link set eth0 down && {ip} link set eth0 address {microvm_net.GUEST_MAC} && "
        f"{ip} link set eth0 up && {ip} -4 addr flush dev eth0 && "
        f"{ip} addr add {microvm_net.GUEST4}/{microvm_net.PREFIX4} dev eth0 && "
        f"{ip} route replace default via {microvm_net.GATEWAY4}"
    )
    another_sandbox = netns.Addresses(7).sandbox4
    spoofs = {
        "another sandbox's address": f"{ip} -4 addr flush dev eth0 && "
        f"{ip} addr add {another_sandbox}/16 dev eth0 && "
        f"{ip} route replace default via {microvm_net.GATEWAY4} dev eth0 onlink",
        "another MAC": f"{ip} link set eth0 down && {ip} link set eth0 address "
        f"52:54:00:00:00:99 && {ip} link set eth0 up && "
        f"{ip} route replace default via {microvm_net.GATEWAY4}",
    }
    got, size = fetch(driver, guest)
    assert got == "allowed.test"  # the probe works, its datagram too
    internet.wait_for("the datagram", service="udp", size=size)
    spoofed = []
    for spoof, script in spoofs.items():
        as_root(driver, guest, script)
        got, size = fetch(driver, guest)
        spoofed.append(size)
        as_root(driver, guest, own)
        assert (spoof, got) == (spoof, "URLError")
        assert fetch(driver, guest)[0] == "allowed.test", f"after {spoof}"
    # Checked last: the fake hosts' reports come a moment after the packet.
    assert [e for size in spoofed for e in internet.saw(service="udp", size=size)] == []


def test_a_denied_udp_send_fails_at_once_on_a_connected_socket(driver: Driver, guest: str) -> None:
    # The host answers what it refuses with an ICMP error that reaches the guest: a
    # client that can hear it (a connected socket) fails at once, not by timeout.
    code = textwrap.dedent("""
        import errno, socket, sys
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(3)
        u.connect((sys.argv[1], 7))
        u.send(b"x")
        try:
            u.recv(64); print("answered")
        except OSError as e:
            print(errno.errorcode.get(e.errno or 0, str(e)))
    """)
    done = driver.ok(op="run", id=guest, argv=["python3", "-c", code, fake.METADATA_V4])
    assert done["stdout"].strip() == "EHOSTUNREACH", done  # ICMP admin-prohibited


@pytest.fixture
def host_port(internet: Internet) -> Iterator[int]:
    """A server on the loopback of the driver's namespace (the host of its sandboxes)."""
    port = 20000 + secrets.randbelow(20000)
    code = textwrap.dedent("""
        import socket, sys
        s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
        print("listening", flush=True)
        while True:
            c, _ = s.accept(); c.sendall(b"the host's"); c.close()
    """)
    argv = ["nsenter", f"--net=/run/netns/{internet.netns(fake.GATEWAY)}", "--"]
    listener = processes.spawn(
        [*argv, sys.executable, "-c", code, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert listener.stdout is not None and listener.stdout.readline() == "listening\n"
    yield port
    processes.stop(listener)


def test_the_host_reaches_a_guest_port_and_never_its_own(
    driver: Driver, guest: str, host_port: int
) -> None:
    serve = textwrap.dedent("""
        import socket, sys
        s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
        print("listening", flush=True)
        c, _ = s.accept(); c.sendall(b"the guest's " + c.recv(64)); c.close()
    """)
    port = 8000
    driver.ok(op="spawn", id=guest, key="serve", argv=["python3", "-c", serve, str(port)])
    for _ in range(100):  # until the guest's server listens
        answer = driver.call(op="port", id=guest, port=port, send="ping")
        if "error" not in answer:
            break
        time.sleep(0.2)
    assert answer == {"reply": "the guest's ping"}
    driver.ok(op="collect", key="serve")
    # Nothing listens on the host's port in the guest: refused, never the host's server.
    # The same with network none, where QEMU runs in the host's own namespace.
    none = str(driver.ok(op="create", network="none", isolation="microvm")["id"])
    try:
        for sandbox in (guest, none):
            answer = driver.call(op="port", id=sandbox, port=host_port, send="ping")
            assert answer.get("error") == "PortClosed", answer
    finally:
        driver.ok(op="destroy", id=none)


@pytest.mark.slow  # a boot through the server; the relay itself is the test above
def test_the_servers_port_proxy_reaches_a_guests_web_app(
    server: LiveServer, settings: Settings
) -> None:
    # The E2B port host's way: `<port>-<id>.<domain>` through the server to the agent.
    if reason := tier_unavailable("microvm", settings):
        pytest.skip(f"microvm tier unavailable here: {reason}")
    template = server_template("microvm")
    with Sandbox.create(template, isolation="microvm", timeout=120, **opts(server)) as sbx:
        sbx.files.write("/tmp/webapp.py", webapp.SOURCE)
        sbx.commands.run("python3 /tmp/webapp.py 8000", background=True)
        url = sbx.get_url(8000)
        wait_until(lambda: httpx.get(url).status_code == 200, "the guest's web app", timeout=60)


def test_a_sandbox_with_a_network_refuses_a_memory_snapshot_saying_why(
    driver: Driver, guest: str, internet: Internet
) -> None:
    answer = driver.call(op="checkpoint", id=guest)
    assert answer["error"] == "IsolationUnavailable", answer
    assert "network 'internet'" in answer["message"] and "network 'none'" in answer["message"]
    assert fetch(driver, guest)[0] == "allowed.test"  # still running, unchanged
