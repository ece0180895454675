"""Networked sandboxes made by a server that is not root: the holder's namespaces and a
slirp4netns uplink (`corral.isolation.usernet`), with the same rules, resolver and events.

The engine runs as `nobody` (uid 65534) inside the fake internet's gateway, as the root
tests' does, with what an administrator gives a rootless Corral (`tests.kit.rootless`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from tests.conftest import ISOLATION_TIERS
from tests.kit import internet as fake
from tests.kit import rootless as rootless_kit
from tests.kit.internet import Internet
from tests.kit.netdriver import Driver
from tests.kit.polling import wait_until
from tests.test_network_hostile import assert_code_cannot_change_its_network

# The root path's tests that hold for any uplink, collected here again, where `driver`
# is a server without root (those of the veth, its pool, the bandwidth cap and the
# reaper of a root server are root's own; the rootless reaper's is below).
from tests.test_network_plumbing import (  # noqa: F401
    PROBE,
    gateway_listener,
    test_a_policy_change_drops_what_the_old_names_opened,
    test_a_policy_change_hits_new_connections_only,
    test_a_private_range_is_reached_only_when_named,
    test_a_sandbox_made_without_a_network_cannot_gain_one,
    test_an_allowlist_of_cidrs_is_exact_ports_too,
    test_connections_are_events_and_a_flood_keeps_its_count,
    test_dns_goes_nowhere_but_the_sandbox_resolver,
    test_dns_rebinding_fails_under_internet,
    test_every_decision_is_counted_exactly_a_flood_too,
    test_internet_reaches_public_hosts_only,
    test_names_resolve_through_the_sandbox_resolver,
    test_none_reaches_nothing,
    test_resolved_addresses_open_only_their_rule_ports,
    test_the_connection_cap_refuses_the_next_connection,
)

pytestmark = [pytest.mark.integration, pytest.mark.sandbox]


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with rootless_kit.home() as base:
        yield base


@pytest.fixture(scope="module")
def delegated(settings: Settings) -> Iterator[str]:
    if missing := rootless_kit.missing():
        pytest.skip(f"rootless sandbox networks need {', '.join(missing)}")
    with rootless_kit.delegated_cgroup(settings.cgroup_parent) as cgroup_parent:
        yield cgroup_parent


def start_driver(internet: Internet, home: Path, cgroup_parent: str) -> Driver:
    config = {
        "runtime_dir": str(home / "run"),
        "data_dir": str(home / "data"),
        "cgroup_parent": cgroup_parent,
        "network_dns": f"{fake.DNS_V4},{fake.DNS_V6}",
    }
    command = [sys.executable, "-m", "tests.kit.netdriver", json.dumps(config)]
    return Driver(rootless_kit.argv(internet.netns(fake.GATEWAY), command))


@pytest.fixture(scope="module")
def rootless(internet: Internet, delegated: str, home: Path) -> Iterator[Driver]:
    driver = start_driver(internet, home, delegated)
    try:
        yield driver
    finally:
        driver.close()


@pytest.fixture(scope="module")
def driver(rootless: Driver) -> Driver:
    """What the root path's tests imported above use: here, the rootless server."""
    return rootless


@pytest.fixture(params=ISOLATION_TIERS)
def tier(request: pytest.FixtureRequest, rootless: Driver) -> str:
    """The tier of the root path's tests imported above, as the rootless server sees it: a
    tier it cannot run, or whose sandboxes it cannot network, skips saying why."""
    name: str = request.param
    if reason := rootless.ok(op="unavailable", tier=name)["reason"]:
        pytest.skip(f"{name} tier unavailable to a rootless server: {reason}")
    return name


def create(driver: Driver, network: str, allow: list[str] | None = None, **limits: Any) -> str:
    return str(driver.ok(op="create", network=network, allow=allow or [], limits=limits)["id"])


def probe(driver: Driver, sandbox: str, probes: list[tuple[str, str, int, str]]) -> list[str]:
    done = driver.ok(op="run", id=sandbox, argv=["python3", "-c", PROBE, json.dumps(probes)])
    assert done["exit_code"] == 0, done
    lines: list[str] = done["stdout"].splitlines()
    return lines


def connects_until(driver: Driver, sandbox: str, wanted: set[tuple[str, str]]) -> list[Any]:
    """The sandbox's events, taken until its connect events hold every (decision,
    address) of `wanted` (the kernel's log comes in batches, up to a second late)."""
    events: list[Any] = []

    def seen() -> bool:
        events.extend(driver.ok(op="events", id=sandbox))
        decided = {(e["decision"], e["address"]) for e in events if e["kind"] == "connect"}
        return wanted <= decided

    wait_until(seen, f"connect events {wanted}")
    return events


def alive(pid: int, start: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return int(stat[stat.rindex(b")") + 2 :].split()[19]) == start


def test_rootless_internet_reaches_neither_the_host_nor_slirp4netns(
    rootless: Driver,
    internet: Internet,
    gateway_listener: tuple[subprocess.Popen[str], int],  # noqa: F811 (the fixture)
) -> None:
    # slirp4netns's connections are the server's own sockets: every address of the host
    # (here the gateway, where a listener waits on all of them, loopback included) would
    # be reached as the host itself, unless denied; so would slirp4netns's gateway and DNS.
    listener, port = gateway_listener
    sandbox = create(rootless, "internet")
    path = "/" + secrets.token_hex(6)
    probes = [
        ("http", fake.GATEWAY_V4, port, path),
        ("http", fake.GATEWAY_V6, port, path),
        ("http", f"::ffff:{fake.GATEWAY_V4}", port, path),
        ("http", "10.0.2.2", port, path),
        ("http", "fd00::2", port, path),
        ("http", "127.0.0.1", port, path),  # its own loopback: the host's is not there
        ("udp", "10.0.2.3", 53, path),
        ("http", fake.ALLOWED_V4, 80, path),  # while the internet is reached
        ("http", fake.ALLOWED_V6, 8080, path),
    ]
    got = probe(rootless, sandbox, probes)
    connects_until(rootless, sandbox, {("denied", fake.GATEWAY_V4), ("denied", "10.0.2.2")})
    rootless.ok(op="destroy", id=sandbox)
    assert got == ["err:ECONNREFUSED"] * 6 + ["err:EPERM"] + ["ok:allowed.test"] * 2
    listener.send_signal(signal.SIGTERM)
    out, _ = listener.communicate(timeout=10)
    assert "accepted" not in out


def test_rootless_allowlist_by_name_through_the_resolver(
    rootless: Driver, internet: Internet
) -> None:
    sandbox = create(rootless, "allowlist", ["allowed.test:80"])
    code = textwrap.dedent("""
        import socket, sys, urllib.request as u
        for name in sys.argv[1:]:
            try:
                print(u.urlopen(f"http://{name}/", timeout=5).read().decode().strip())
            except OSError as e:
                print(type(getattr(e, "reason", e)).__name__)
    """)
    names = ["allowed.test", "denied.test", "rebind.test"]
    done = rootless.ok(op="run", id=sandbox, argv=["python3", "-c", code, *names])
    # Straight to the address denied.test has: no name of the list resolved to it.
    direct = probe(rootless, sandbox, [("http", fake.DENIED_V4, 80, "/")])
    wanted = {("allowed", fake.ALLOWED_V4), ("denied", fake.DENIED_V4)}
    events = connects_until(rootless, sandbox, wanted)
    rootless.ok(op="destroy", id=sandbox)
    assert done["stdout"].split() == ["allowed.test", "gaierror", "gaierror"], done
    assert direct == ["err:ECONNREFUSED"]
    dns = {(e["name"], e["decision"]) for e in events if e["kind"] == "dns"}
    assert {("allowed.test", "allowed"), ("denied.test", "denied")} <= dns, events


def test_rootless_code_cannot_change_its_network(rootless: Driver, internet: Internet) -> None:
    assert_code_cannot_change_its_network(rootless, internet, uplink="tap0")


def test_rootless_teardown_leaves_nothing(rootless: Driver, home: Path) -> None:
    sandbox = create(rootless, "internet")
    footprint: dict[str, Any] = rootless.ok(op="footprint", id=sandbox)
    processes = footprint["processes"]
    assert len(processes) == 2  # the holder and slirp4netns
    assert all(alive(pid, start) for pid, start in processes)
    holder, slirp = processes[0][0], processes[1][0]
    # slirp4netns parses the sandbox's packets: it runs under its own seccomp filter.
    assert "Seccomp:\t2" in Path(f"/proc/{slirp}/status").read_text()
    netns = os.stat(f"/proc/{holder}/ns/net").st_ino
    assert os.readlink(footprint["netns"]) == f"/proc/{holder}/ns/net"
    rootless.ok(op="destroy", id=sandbox)
    assert not any(alive(pid, start) for pid, start in processes)
    assert not Path(footprint["path"]).exists()
    # No process of the host is left in that namespace.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                assert os.stat(entry / "ns/net").st_ino != netns, entry
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue


def test_a_killed_rootless_server_leaves_no_holder_nor_uplink(
    internet: Internet, delegated: str, home: Path
) -> None:
    # SIGKILL: no cleanup code runs. The holder ends at the end of its socket pair,
    # slirp4netns when its exit pipe closes (and the sandbox with its parent).
    driver = start_driver(internet, home, delegated)
    sandbox = create(driver, "internet")
    processes = driver.ok(op="footprint", id=sandbox)["processes"]
    assert all(alive(pid, start) for pid, start in processes)
    driver.process.kill()
    driver.process.wait()
    wait_until(
        lambda: not any(alive(pid, start) for pid, start in processes),
        "the holder and slirp4netns to end with their server",
    )
    # The next server's reaper removes the sandbox's record.
    driver = start_driver(internet, home, delegated)
    driver.close()
    wait_until(
        lambda: not (home / "run" / "sandboxes" / sandbox).exists(),
        "the reaper to remove the dead server's sandbox",
    )


def test_rootless_sandbox_code_holds_no_capability(rootless: Driver) -> None:
    # It runs in a child user namespace of the holder's, as uid 1000, with no capability
    # in it (so none over the holder's network namespace either).
    sandbox = create(rootless, "internet")
    status = rootless.ok(op="run", id=sandbox, argv=["cat", "/proc/self/status"])["stdout"]
    rootless.ok(op="destroy", id=sandbox)
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "1000"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])


def test_the_rootless_bandwidth_cap_slows_a_download_and_an_upload(rootless: Driver) -> None:
    # Without root the cap is the sandbox's own rules dropping what goes over it (no
    # uplink of the host's to shape). nftables' byte limit starts with a second's worth
    # in its bucket: 6 MB at 16 Mbit/s (2 MB/s) takes about 2 s each way; uncapped,
    # milliseconds. A wide margin: this checks that a cap is applied, not how exact it is.
    code = (
        "import time, urllib.request as u\n"
        "start = time.monotonic()\n"
        "size = len(u.urlopen('http://192.0.2.10/bytes/6000000', timeout=60).read())\n"
        "down = time.monotonic() - start\n"
        "start = time.monotonic()\n"
        "u.urlopen(u.Request('http://192.0.2.10/upload', data=b'x' * 6000000), timeout=60)\n"
        "print(size, down, time.monotonic() - start)\n"
    )
    capped = create(rootless, "internet", bandwidth_mbit=16)
    done = rootless.ok(op="run", id=capped, argv=["python3", "-c", code])
    rootless.ok(op="destroy", id=capped)
    size, down, up = done["stdout"].split()
    assert int(size) == 6_000_000
    assert float(down) >= 1.5 and float(up) >= 1.5, done


def test_without_slirp4netns_the_rootless_tier_offers_none_and_says_what_to_install(
    internet: Internet, delegated: str, home: Path
) -> None:
    bindir = home / "bin"  # unshare and nsenter, not slirp4netns
    bindir.mkdir(exist_ok=True)
    for tool in ("unshare", "nsenter"):
        with contextlib.suppress(FileExistsError):
            (bindir / tool).symlink_to(str(shutil.which(tool)))
    code = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        os.environ["PATH"] = sys.argv[2]
        from corral.config import Settings
        from corral.isolation.namespace import NamespaceBackend
        backend = NamespaceBackend(Settings(runtime_dir=Path(sys.argv[1])))
        print(sorted(backend.network_modes()))
        print(NamespaceBackend.probe(backend.settings).details["network_needs"])
    """)
    command = [sys.executable, "-c", code, str(home / "run"), str(bindir)]
    argv = rootless_kit.argv(internet.netns(fake.GATEWAY), command)
    done = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['none']", "slirp4netns: apt-get install slirp4netns"]
