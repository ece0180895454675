"""Issue 12 as a user gets it: `corral server` (the CLI, default settings) runs in the fake
internet's gateway namespace, and the CLI and the SDK (also run there: the server listens
on the gateway's loopback) create networked sandboxes and jobs, read their network events,
change their policies and reach their ports.

The server resolves names the way a host does, from its /etc/resolv.conf: it runs in a
mount namespace of its own where the gateway's resolv.conf (the fake DNS server) is bound
over /etc/resolv.conf, as `ip netns exec` does (which would also remount /sys, hiding
the cgroups). Nothing here reaches past the fake internet: the gateway has no route out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from corral.config import Settings
from corral.isolation import netns
from tests.conftest import free_port
from tests.kit import internet as fake
from tests.kit import processes
from tests.kit.internet import Internet
from tests.kit.polling import wait_until

pytestmark = [pytest.mark.acceptance, pytest.mark.sandbox]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class GatewayServer:
    """A `corral server` in the gateway namespace, and the CLI and SDK next to it."""

    internet: Internet
    url: str
    key: str
    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def in_gateway(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.internet.netns(fake.GATEWAY)}", "--", *argv]

    def corral(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The `corral` CLI, in the gateway, pointed at this server by its options."""
        argv = [sys.executable, "-m", "corral.cli", "--server", self.url, "--api-key", self.key]
        return subprocess.run(
            self.in_gateway([*argv, *args]),
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
        )  # fmt: skip

    def ok(self, *args: str, timeout: float = 120) -> str:
        done = self.corral(*args, timeout=timeout)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def sdk(self, code: str, timeout: float = 120) -> Any:
        """Run `code` (SDK calls; `opts` holds the server's options) in the gateway; the
        JSON it prints last."""
        options = {"server": self.url, "api_key": self.key}
        prelude = f"import json\nfrom corral import Sandbox\nopts = {options!r}\n"
        done = subprocess.run(
            self.in_gateway([sys.executable, "-c", prelude + textwrap.dedent(code)]),
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout, done.stderr)
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gw(internet: Internet, settings: Settings) -> Iterator[GatewayServer]:
    if missing := netns.tools_missing():
        pytest.skip(f"sandbox networks need {', '.join(missing)}")
    # Under the session's runtime dir: sandboxes' own uids must traverse the data dir.
    base = Path(tempfile.mkdtemp(prefix="accept-", dir=settings.runtime_dir))
    base.chmod(0o755)
    data_dir, port = base / "data", free_port()
    # Test hygiene only: the session's runtime dir and cgroup parent (swept after the
    # session) and a config file that is not ~/.corral's; every other setting is default.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env |= {
        "CORRAL_RUNTIME_DIR": str(settings.runtime_dir),
        "CORRAL_CGROUP_PARENT": settings.cgroup_parent,
        "CORRAL_CONFIG": str(base / "config"),
    }
    gateway = internet.netns(fake.GATEWAY)
    resolv = fake.NETNS_DIR / gateway / "resolv.conf"
    server = [sys.executable, "-m", "corral.cli", "server", "--port", str(port),
              "--data-dir", str(data_dir), "--pool-size", "0"]  # fmt: skip
    argv = [
        "nsenter", f"--net=/run/netns/{gateway}", "--",
        "unshare", "--mount", "--propagation", "slave", "--",
        "sh", "-c", f'mount --bind {resolv} /etc/resolv.conf && exec "$@"', "sh", *server,
    ]  # fmt: skip
    log = base / "server.log"
    with log.open("ab") as sink:
        process = processes.spawn(argv, env=env, stdout=sink, stderr=sink, cwd=ROOT)
    live = GatewayServer(internet, f"http://127.0.0.1:{port}", "", data_dir, env, process, log)
    probe = f"import urllib.request as u; u.urlopen('{live.url}/healthz', timeout=1)"

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"corral server exited {process.returncode}: {log.read_text()}")
        check = [sys.executable, "-c", probe]
        return subprocess.run(live.in_gateway(check), capture_output=True).returncode == 0

    try:
        wait_until(answering, "the corral server in the gateway to answer /healthz", timeout=60)
    except BaseException:
        processes.stop(process, signal.SIGKILL)
        raise
    live.key = (data_dir / "default.key").read_text().strip()
    try:
        yield live
    finally:
        processes.stop(process)


FETCH = textwrap.dedent("""
    import json, sys, urllib.request as u
    out = {}
    for url in sys.argv[1:]:
        try:
            out[url] = u.urlopen(url, timeout=5).read().decode().strip()
        except Exception as e:
            out[url] = type(e).__name__ + ": " + str(getattr(e, "reason", e))
    print(json.dumps(out))
""")


def fetched(stdout: str) -> dict[str, str]:
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def test_run_internet_reaches_a_host_by_name(gw: GatewayServer) -> None:
    for mode in ("internet", "allow_all"):
        out = gw.ok("run", "--network", mode, "--", "python3", "-c", FETCH, "http://allowed.test/")
        assert fetched(out) == {"http://allowed.test/": "allowed.test"}, mode


def events(gw: GatewayServer, sandbox_id: str) -> list[dict[str, Any]]:
    out = gw.ok("sandbox", "events", sandbox_id, "-o", "json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_for_events(
    gw: GatewayServer, sandbox_id: str, *wanted: dict[str, Any]
) -> list[dict[str, Any]]:
    """The sandbox's events once each of `wanted` (fields to match) is among them: the
    kernel's log of a connection reaches the server a moment after the connection."""

    def all_there() -> list[dict[str, Any]] | None:
        found = events(gw, sandbox_id)
        for want in wanted:
            if not any(all(e.get(k) == v for k, v in want.items()) for e in found):
                return None
        return found

    return wait_until(all_there, f"events {wanted} of {sandbox_id}")


def test_run_none_reaches_nothing(gw: GatewayServer) -> None:
    for mode in ("none", "deny_all"):  # deny_all: Agent/krunvm's name for it
        out = gw.ok("run", "--network", mode, "--", "python3", "-c", FETCH,
                    "http://allowed.test/", f"http://{fake.ALLOWED_V4}/")  # fmt: skip
        assert all(r.startswith("URLError") for r in fetched(out).values()), (mode, out)
    # A sandbox made without a network cannot be given one: a clear refusal, exit 3.
    sid = gw.ok("sandbox", "create").strip()
    done = gw.corral("sandbox", "network", sid, "internet")
    assert done.returncode == 3 and "create a new sandbox" in done.stderr, done
    gw.ok("sandbox", "kill", sid)


def test_run_allowlist_reaches_its_entry_only(gw: GatewayServer) -> None:
    urls = ["http://allowed.test/", "http://denied.test/", "http://allowed.test:8080/",
            f"http://{fake.DENIED_V4}/", f"http://[{fake.ALLOWED_V6}]/"]  # fmt: skip
    out = gw.ok("run", "--allow", "allowed.test:80", "--", "python3", "-c", FETCH, *urls)
    result = fetched(out)
    assert result.pop("http://allowed.test/") == "allowed.test"
    # The name resolved, so its v6 address was opened too, on port 80 only.
    assert result.pop(f"http://[{fake.ALLOWED_V6}]/") == "allowed.test"
    assert all(r.startswith("URLError") for r in result.values()), result


# Hostile code: each attempt prints what it got; anything but an error is a way out.
PROBE = textwrap.dedent("""
    import json, socket, struct, sys

    def tcp(address, port):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect((address, port))
                s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
                return "reached: " + reply.decode(errors="replace")
        except OSError as e:
            return type(e).__name__

    def by_name(name, port):
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except OSError as e:
            return type(e).__name__
        return [tcp(info[4][0], port) for info in infos]

    def dns_query(name):
        header = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        return header + labels + b"\\0" + struct.pack(">HH", 1, 1)

    def raw_dns_udp(server):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                s.sendto(dns_query("allowed.test"), (server, 53))
                return "reached: %d bytes" % len(s.recv(512))
        except OSError as e:
            return type(e).__name__

    def dns_tcp(server):
        try:
            with socket.create_connection((server, 53), timeout=3) as s:
                query = dns_query("allowed.test")
                s.sendall(struct.pack(">H", len(query)) + query)
                return "reached: %d bytes" % len(s.recv(512))
        except OSError as e:
            return type(e).__name__

    def gateway():
        for line in open("/proc/net/route").read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))

    targets = json.loads(sys.argv[1])
    out = {
        "metadata": tcp("169.254.169.254", 80),
        "metadata, v4-mapped v6": tcp("::ffff:169.254.169.254", 80),
        "private host": tcp("10.99.0.10", 80),
        "private.test": by_name("private.test", 80),
        "rebind.test": by_name("rebind.test", 80),
        "metadata.test": by_name("metadata.test", 80),
        "uplink gateway": tcp(gateway(), targets["host_port"]),
        "host, internet side": tcp("192.0.2.1", targets["host_port"]),
        "host, v6": tcp("2001:db8::1", targets["host_port"]),
        "host loopback, v4-mapped": tcp("::ffff:127.0.0.1", targets["host_port"]),
        "dns to another resolver": raw_dns_udp("198.51.100.53"),
        "dns over tcp outside": dns_tcp("203.0.113.53"),
        "another sandbox": tcp(targets["other"], 8000),
        "public host": tcp("192.0.2.10", 80),
    }
    print(json.dumps(out))
""")

OWN_ADDRESS = (
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
    "s.connect(('192.0.2.10', 7)); print(s.getsockname()[0])"
)


def test_hostile_code_under_internet_reaches_only_public_hosts(
    gw: GatewayServer, internet: Internet
) -> None:
    # Listening where a way out would land: a web server on every address of the host
    # (the gateway), and one in another internet sandbox.
    port = free_port()
    host_web = processes.spawn(
        gw.in_gateway([sys.executable, "-m", "http.server", str(port), "--bind", "::"]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    other = gw.ok("sandbox", "create", "--network", "internet").strip()
    gw.ok("sandbox", "exec", "--background", other, "--", "python3", "-m", "http.server", "8000")
    other_address = gw.ok("sandbox", "exec", other, "--", "python3", "-c", OWN_ADDRESS).strip()
    probe = """import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3): print("up")"""
    wait_until(
        lambda: gw.corral("sandbox", "exec", other, "--", "python3", "-c", probe,
                          "127.0.0.1", "8000").returncode == 0,
        "the other sandbox's web server",
    )  # fmt: skip
    wait_until(
        lambda: subprocess.run(gw.in_gateway([sys.executable, "-c", probe, "127.0.0.1",
                               str(port)]), capture_output=True).returncode == 0,
        "the host's web server",
    )  # fmt: skip

    def hits() -> list[dict[str, Any]]:
        return [
            e for e in internet.seen
            if e.get("address") in (fake.PRIVATE_V4, fake.METADATA_V4, fake.OTHER_DNS_V4)
            or (e.get("service") == "dns" and e.get("transport") == "tcp")
        ]  # fmt: skip

    before = len(hits())
    hostile = gw.ok("sandbox", "create", "--network", "internet").strip()
    targets = json.dumps({"host_port": port, "other": other_address})
    out = gw.ok("sandbox", "exec", hostile, "--", "python3", "-c", PROBE, targets)
    result = json.loads(out.strip().splitlines()[-1])
    assert result.pop("public host").endswith("allowed.test\n"), out
    reached = {k: v for k, v in result.items() if "reached" in json.dumps(v)}
    assert reached == {}, reached
    # Names that resolve only to denied addresses get no usable address at all.
    for name in ("private.test", "rebind.test", "metadata.test"):
        assert result[name] in ("gaierror", []), (name, result[name])
    assert len(hits()) == before, hits()[before:]
    # The same host answers the other sandbox itself (it was listening all along).
    out = gw.ok("sandbox", "exec", other, "--", "python3", "-c", probe, other_address, "8000")
    assert out.strip() == "up"
    for sandbox_id in (hostile, other):
        gw.ok("sandbox", "kill", sandbox_id)
    processes.stop(host_web)


FLOOD = textwrap.dedent("""
    import socket, sys
    refused = 0
    for _ in range(int(sys.argv[2])):
        try:
            socket.create_connection((sys.argv[1], 80), timeout=3).close()
        except OSError:
            refused += 1
    print(refused)
""")


def test_events_name_the_rule_and_a_flood_keeps_its_count(gw: GatewayServer) -> None:
    sid = gw.ok("sandbox", "create", "--allow", "allowed.test:80").strip()
    gw.ok("sandbox", "exec", sid, "--", "python3", "-c", FETCH,
          "http://allowed.test/", "http://denied.test/", "http://allowed.test:8080/")  # fmt: skip
    found = wait_for_events(
        gw, sid,
        {"kind": "dns", "decision": "allowed", "name": "allowed.test", "rule": "allowed.test:80"},
        {"kind": "dns", "decision": "denied", "name": "denied.test"},
        {"kind": "connect", "decision": "allowed", "address": fake.ALLOWED_V4, "port": 80,
         "rule": "allowed.test:80"},
        {"kind": "connect", "decision": "denied", "address": fake.ALLOWED_V4, "port": 8080},
    )  # fmt: skip
    denied = [e for e in found if e["decision"] == "denied"]
    assert all(e["rule"] for e in denied), denied
    table = gw.ok("sandbox", "events", sid)
    assert "denied dns denied.test" in table and "(rule: allowed.test:80)" in table, table

    # 2000 connections refused in a burst: a bounded number of rows, the count exact.
    flood = gw.ok("sandbox", "create", "--network", "internet").strip()
    out = gw.ok("sandbox", "exec", flood, "--", "python3", "-c", FLOOD, fake.PRIVATE_V4, "2000")
    assert out.strip() == "2000"

    def counted() -> list[dict[str, Any]] | None:
        rows = [e for e in events(gw, flood) if e["decision"] == "denied"]
        return rows if sum(e["count"] for e in rows) >= 2000 else None

    rows = wait_until(counted, "the flood's 2000 denied connections to be counted")
    assert sum(e["count"] for e in rows) == 2000, rows[-3:]
    suppressed = [e for e in rows if e["kind"] == "suppressed"]
    assert suppressed and {e["name"] for e in suppressed} == {"connect"}, suppressed
    assert len(rows) < 500, len(rows)
    assert {e["address"] for e in rows if e["kind"] == "connect"} == {fake.PRIVATE_V4}
    for sandbox_id in (sid, flood):
        gw.ok("sandbox", "kill", sandbox_id)


def reach(gw: GatewayServer, sandbox_id: str) -> dict[str, bool]:
    """Which of allowed.test and denied.test (port 80, by name) the sandbox reaches now."""
    urls = {"allowed": "http://allowed.test/", "denied": "http://denied.test/"}
    argv = ["python3", "-c", FETCH, *urls.values()]
    out = fetched(gw.ok("sandbox", "exec", sandbox_id, "--", *argv))
    return {host: out[url] == f"{host}.test" for host, url in urls.items()}


def test_cli_changes_a_running_sandboxs_network(gw: GatewayServer) -> None:
    sid = gw.ok("sandbox", "create", "--allow", "allowed.test:80").strip()
    assert reach(gw, sid) == {"allowed": True, "denied": False}
    gw.ok("sandbox", "network", sid, "allowlist", "--allow", "denied.test:80")
    assert reach(gw, sid) == {"allowed": False, "denied": True}
    gw.ok("sandbox", "network", sid, "internet")
    assert reach(gw, sid) == {"allowed": True, "denied": True}
    gw.ok("sandbox", "network", sid, "none")
    assert reach(gw, sid) == {"allowed": False, "denied": False}
    # A bad entry changes nothing and says what to write.
    done = gw.corral("sandbox", "network", sid, "allowlist", "--allow", "allowed.test:99999")
    assert done.returncode == 2 and "allowed.test:99999" in done.stderr, done
    assert reach(gw, sid) == {"allowed": False, "denied": False}
    gw.ok("sandbox", "kill", sid)


SDK_FETCH = f"FETCH = {FETCH!r}\n" + textwrap.dedent("""
    def reach(sbx):
        urls = {"allowed": "http://allowed.test/", "denied": "http://denied.test/"}
        result = sbx.commands.run(["python3", "-c", FETCH, *urls.values()])
        out = json.loads(result.stdout.strip().splitlines()[-1])
        return {host: out[url] == host + ".test" for host, url in urls.items()}
""")


def test_sdk_creates_and_updates_a_networked_sandbox(gw: GatewayServer) -> None:
    got = gw.sdk(
        SDK_FETCH
        + textwrap.dedent("""
        seen = {}
        with Sandbox.create(network={"mode": "allowlist", "allow": ["allowed.test:80"]},
                            **opts) as sbx:
            seen["allowlist"] = [sbx.network.mode, reach(sbx)]
            sbx.update_network("allowlist", allow=["denied.test"])
            seen["updated"] = [sbx.network.mode, reach(sbx)]
            sbx.update_network("none")
            seen["none"] = [sbx.network.mode, reach(sbx)]
            kinds = {(e.kind, e.decision) for e in sbx.events()}
            seen["events"] = sorted(" ".join(k) for k in kinds)
        with Sandbox.create(allow_internet_access=True, **opts) as sbx:
            seen["e2b"] = [sbx.network.mode, reach(sbx)]
        print(json.dumps(seen))
    """)
    )
    assert got["allowlist"] == ["allowlist", {"allowed": True, "denied": False}]
    assert got["updated"] == ["allowlist", {"allowed": False, "denied": True}]
    assert got["none"] == ["none", {"allowed": False, "denied": False}]
    assert {"dns allowed", "dns denied"} <= set(got["events"]), got["events"]
    assert got["e2b"] == ["internet", {"allowed": True, "denied": True}]


def test_a_job_reaches_its_allowlist_and_records_network_events(gw: GatewayServer) -> None:
    urls = ["http://allowed.test/", "http://denied.test/", f"http://{fake.DENIED_V4}/"]
    done = gw.corral("job", "submit", "--network", "allowlist", "--allow", "allowed.test",
                     "--wait", "--", "python3", "-c", FETCH, *urls)  # fmt: skip
    assert done.returncode == 0, done
    job_id = done.stdout.split()[1]
    result = fetched(gw.ok("job", "logs", job_id))
    assert result.pop("http://allowed.test/") == "allowed.test"
    assert all(r.startswith("URLError") for r in result.values()), result
    # Every event of the job is stored before its end: no waiting here.
    lines = gw.ok("job", "events", "-o", "json", job_id).splitlines()
    network = [json.loads(line)["data"] for line in lines if '"network"' in line]
    seen = {(e["kind"], e["decision"], e["name"] or e["address"], e["port"]) for e in network}
    assert {
        ("dns", "allowed", "allowed.test", 0),
        ("dns", "denied", "denied.test", 0),
        ("connect", "allowed", fake.ALLOWED_V4, 80),
        ("connect", "denied", fake.DENIED_V4, 80),
    } <= seen, network
    table = gw.ok("job", "events", job_id)
    lines = [line for line in table.splitlines() if "network:" in line]
    assert len(lines) == len(network)
    assert any(f"denied connect tcp {fake.DENIED_V4}:80" in line for line in lines), table
    assert not any("answers=" in line for line in lines), table  # said once, not twice


def http_get(gw: GatewayServer, url: str, headers: dict[str, str] | None = None) -> str:
    """GET `url` from the gateway (where the server listens): status and body."""
    code = textwrap.dedent("""
        import json, sys, urllib.request as u, urllib.error
        request = u.Request(sys.argv[1], headers=json.loads(sys.argv[2]))
        try:
            with u.urlopen(request, timeout=10) as reply:
                print(reply.status, reply.read().decode().strip())
        except urllib.error.HTTPError as e:
            print(e.code, e.read().decode().strip())
    """)
    argv = [sys.executable, "-c", code, url, json.dumps(headers or {})]
    done = subprocess.run(gw.in_gateway(argv), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


SERVE = "echo served-from-the-sandbox > index.html && exec python3 -m http.server 8000"


def test_the_port_proxy_reaches_a_networked_sandbox(gw: GatewayServer) -> None:
    sid = gw.ok("sandbox", "create", "--network", "internet").strip()
    gw.ok("sandbox", "exec", "--background", sid, "--", "sh", "-c", SERVE)
    url = gw.ok("sandbox", "url", sid, "8000").strip()
    wait_until(lambda: http_get(gw, url).startswith("200"), "the sandbox's web server")
    assert http_get(gw, url) == "200 served-from-the-sandbox"
    # Its own network is unchanged by the proxy: the internet, and still no private host.
    urls = ["http://allowed.test/", f"http://{fake.PRIVATE_V4}/"]
    result = fetched(gw.ok("sandbox", "exec", sid, "--", "python3", "-c", FETCH, *urls))
    assert result["http://allowed.test/"] == "allowed.test"
    assert result[f"http://{fake.PRIVATE_V4}/"].startswith("URLError"), result
    gw.ok("sandbox", "kill", sid)


def test_e2b_style_sdk_internet_access_and_get_host(gw: GatewayServer) -> None:
    got = gw.sdk(
        SDK_FETCH
        + textwrap.dedent("""
        import time, urllib.request as u
        with Sandbox.create(allow_internet_access=True, **opts) as sbx:
            sbx.commands.run(["sh", "-c", SERVE], background=True)
            host = sbx.get_host(8000)
            # *.localhost is this machine: ask the server's address with that Host.
            request = u.Request(opts["server"] + "/", headers={
                "Host": host, "X-Corral-Traffic-Token": sbx.traffic_token})
            for _ in range(100):
                try:
                    body = u.urlopen(request, timeout=5).read().decode().strip()
                    break
                except OSError:
                    time.sleep(0.1)
            print(json.dumps({"host": host, "id": sbx.sandbox_id, "body": body,
                              "reach": reach(sbx)}))
    """).replace("SERVE", repr(SERVE))
    )
    assert got["host"].startswith(f"8000-{got['id']}.")
    assert got["body"] == "served-from-the-sandbox"
    assert got["reach"] == {"allowed": True, "denied": True}
