"""The NFLOG reader, for real: a scratch network namespace with no way out (a veth pair
with both ends inside it, one holding 192.0.2.2/24 and 2001:db8::2/64; no default
route), an nftables rule there that logs TCP and UDP on output to a group, packets sent
to 192.0.2.1 / 2001:db8::1 from inside it, and the records read from a socket opened in
it by the host."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.network.nflog import LogRecord, NflogReader, destination, parse
from tests.kit import internet as fake_internet

GROUP = 7
# Sent from inside the namespace: a TCP SYN (a non-blocking connect that nothing answers)
# and a UDP datagram, to each destination given.
SENDER = """
import socket, sys
for address, tcp_port, udp_port in (a.split(",") for a in sys.argv[1:]):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as tcp:
        tcp.setblocking(False)
        try:
            tcp.connect((address, int(tcp_port)))
        except BlockingIOError:
            pass
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"x", (address, int(udp_port)))
"""


def run(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


@pytest.fixture
def netns() -> Iterator[str]:
    """A scratch namespace whose only link is a veth pair within it: nothing it sends
    leaves it."""
    if (why := fake_internet.unavailable()) is not None:
        pytest.skip(why)
    name = f"cnl{secrets.token_hex(3)}"
    run("ip", "netns", "add", name)
    try:
        run("ip", "-n", name, "link", "set", "lo", "up")
        # Both ends in the namespace (this kernel has no dummy links): what goes out of
        # d0 arrives at d1, which has no address and does not forward.
        run("ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        run("ip", "-n", name, "link", "set", "d0", "up")
        run("ip", "-n", name, "link", "set", "d1", "up")
        run("ip", "-n", name, "addr", "add", "192.0.2.2/24", "dev", "d0")
        run("ip", "-n", name, "addr", "add", "2001:db8::2/64", "dev", "d0", "nodad")
        # The destinations' link addresses are fixed: packets leave at once rather than
        # queue for an answer to ARP / neighbour discovery that nothing would give.
        for address in ("192.0.2.1", "2001:db8::1"):
            lladdr = "02:00:00:00:00:01"
            run("ip", "-n", name, "neigh", "add", address, "lladdr", lladdr, "dev", "d0")
        ruleset = f"""
        table inet t {{
          chain out {{
            type filter hook output priority 0;
            oifname "lo" accept
            meta l4proto tcp log group {GROUP} prefix "corral tcp"
            meta l4proto udp log group {GROUP} prefix "corral udp"
          }}
        }}
        """
        run("ip", "netns", "exec", name, "nft", "-f", "-", stdin=ruleset)
        routes = run_out("ip", "-n", name, "route", "show", "default")
        routes6 = run_out("ip", "-n", name, "-6", "route", "show", "default")
        assert routes == routes6 == "", "the scratch namespace must have no default route"
        yield name
    finally:
        fake_internet.delete_netns(name)


def run_out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


async def collect(reader: NflogReader, count: int) -> list[LogRecord]:
    records: list[LogRecord] = []

    async def read() -> None:
        async for record in reader.records():
            records.append(record)
            if len(records) == count:
                return

    await asyncio.wait_for(read(), 10)
    return records


async def send_and_read(netns: str, *targets: str, count: int) -> list[LogRecord]:
    reader = NflogReader.open(Path("/run/netns") / netns, GROUP)
    try:
        sender = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, sys.executable, "-c", SENDER, *targets
        )
        assert await sender.wait() == 0
        return await collect(reader, count)
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("address", "family"), [("192.0.2.1", "v4"), ("2001:db8::1", "v6")], ids=["v4", "v6"]
)
async def test_a_syn_and_a_datagram_are_read_with_prefix_and_destination(
    netns: str, address: str, family: str
) -> None:
    records = await send_and_read(netns, f"{address},443,53", count=2)
    assert sorted(records, key=lambda r: r.protocol) == [
        LogRecord("corral tcp", "tcp", address, 443),
        LogRecord("corral udp", "udp", address, 53),
    ]


async def test_the_socket_sees_its_own_namespace_only(netns: str) -> None:
    """Packets logged in another namespace (a second scratch one, same group) are not
    read: the socket belongs to the namespace it was opened in."""
    other = f"cnl{secrets.token_hex(3)}"
    run("ip", "netns", "add", other)
    try:
        reader = NflogReader.open(Path("/run/netns") / other, GROUP)
        try:
            records = await send_and_read(netns, "192.0.2.1,80,7", count=2)
            assert len(records) == 2
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(collect(reader, 1), 0.5)
        finally:
            reader.close()
    finally:
        fake_internet.delete_netns(other)


def test_a_group_taken_in_the_namespace_is_refused(netns: str) -> None:
    first = NflogReader.open(Path("/run/netns") / netns, GROUP)
    try:
        with pytest.raises(OSError, match=f"NFLOG group {GROUP}"):
            NflogReader.open(Path("/run/netns") / netns, GROUP)
    finally:
        first.close()


def test_an_unknown_namespace_is_refused() -> None:
    with pytest.raises(FileNotFoundError):
        NflogReader.open("/run/netns/no-such-corral-netns", GROUP)
    with pytest.raises(ValueError, match="out of range"):
        NflogReader.open("/proc/self/ns/net", 70000)


def test_short_and_foreign_packets_yield_nothing() -> None:
    assert destination(b"") is None
    assert destination(b"\x45" + b"\0" * 10) is None  # an IPv4 header cut short
    assert list(parse(b"\x00" * 8)) == []
    # ICMP: an address, no port.
    icmp = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0, 192, 0, 2, 2, 192, 0, 2, 1]) + bytes(8)
    assert destination(icmp) == ("icmp", "192.0.2.1", 0)


FLOOD = """
import socket
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    for i in range(30000):
        udp.sendto(b"x", ("192.0.2.1", 1 + i % 1000))
"""
MARKER = """
import socket, time
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
    while True:
        udp.sendto(b"x", ("192.0.2.1", 9999))
        time.sleep(0.1)
"""


async def test_a_reader_that_falls_behind_counts_the_overrun_and_reads_on(netns: str) -> None:
    """A flood the socket's buffer cannot hold: the kernel drops records and says so
    (ENOBUFS); the reader counts it and goes on to the records that follow."""
    reader = NflogReader.open(Path("/run/netns") / netns, GROUP)
    try:
        sender = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, sys.executable, "-c", FLOOD
        )
        assert await sender.wait() == 0  # all sent before a single record is read
        received = 0

        async def until_last() -> None:
            nonlocal received
            async for record in reader.records():
                received += 1
                if record.port == 9999:
                    return

        # Each record is sent as it is logged, so the flood's last ones found the buffer
        # full too: the records that follow are sent while the reader catches up.
        marker = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, sys.executable, "-c", MARKER
        )

        try:
            await asyncio.wait_for(until_last(), 20)
        finally:
            marker.kill()
            await marker.wait()
        assert reader.overruns >= 1
        assert received < 30001, "some records must have been dropped"
    finally:
        reader.close()


def test_a_record_is_waiting_as_soon_as_its_packet_is_sent(netns: str) -> None:
    """No batching: a sandbox that ends right after a connection has its record already
    sent, which `pending` reads without waiting (the kernel's default holds records for
    up to a second, and the sandbox's network would be gone by then)."""
    reader = NflogReader.open(Path("/run/netns") / netns, GROUP)
    try:
        assert reader.pending() == []
        send = (
            "import socket\n"
            "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('192.0.2.1', 4242))"
        )
        subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", send], check=True)
        assert reader.pending() == [LogRecord("corral udp", "udp", "192.0.2.1", 4242)]
        assert reader.pending() == []
    finally:
        reader.close()
