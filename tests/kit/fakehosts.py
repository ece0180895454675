"""The servers of the fake internet: HTTP hosts, UDP echo, and an authoritative DNS server.

Run as `python -m tests.kit.fakehosts SPEC_JSON` inside the fake internet's namespace (see
`tests.kit.internet`, which builds the namespaces and starts this). Every socket is bound
before the process prints `ready`; after that it prints one JSON line per request it saw
(`{"service": "http"|"dns"|"udp", "address": ..., ...}`), so that a test can prove that
a host was reached, or that it never was.

SPEC_JSON: {"http": {address: host name}, "dns": [address...], "zone": {name: [address...]}}.
HTTP hosts answer on ports 80 and 8080 (port rules need two ports on one host), UDP echo
on port 7 of the same addresses; `GET /bytes/N` returns N bytes (throughput), any other
path the host's name and a newline (who answered). The DNS server answers A and AAAA from
the zone (a `*.` entry covers names below it), NXDOMAIN for names it does not hold.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import socketserver
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

HTTP_PORTS = (80, 8080)
ECHO_PORT = 7
DNS_PORT = 53
_BYTES_LIMIT = 1 << 30

_print_lock = threading.Lock()


def report(**event: Any) -> None:
    """One JSON line on stdout, whole (threads print concurrently)."""
    with _print_lock:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


# -- HTTP ------------------------------------------------------------------------------------


class _HTTPHandler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        address, port = self.server.server_address[:2]
        report(service="http", address=address, port=port, client=self.client_address[0],
               host_header=self.headers.get("Host"), path=self.path)  # fmt: skip
        parts = self.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
            self._send_bytes(min(int(parts[1]), _BYTES_LIMIT))
            return
        body = f"{self.server.host_name}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """Takes a body (an upload) and says how many bytes came."""
        address, port = self.server.server_address[:2]
        size = int(self.headers.get("Content-Length") or 0)
        received = 0
        while received < size:
            chunk = self.rfile.read(min(65536, size - received))
            if not chunk:
                break
            received += len(chunk)
        report(service="http", address=address, port=port, client=self.client_address[0],
               method="POST", path=self.path, received=received)  # fmt: skip
        body = f"{received}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_bytes(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = b"x" * 65536
        while size > 0:
            self.wfile.write(chunk[:size])
            size -= len(chunk)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are reported as JSON lines instead


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str, port: int, host_name: str) -> None:
        self.address_family = family_of(address)
        self.host_name = host_name
        super().__init__((address, port), _HTTPHandler)


# -- UDP echo --------------------------------------------------------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    server: _EchoServer

    def handle(self) -> None:
        data, sock = self.request
        report(service="udp", address=self.server.server_address[0], port=ECHO_PORT,
               client=self.client_address[0], size=len(data))  # fmt: skip
        sock.sendto(data, self.client_address)


class _EchoServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: str) -> None:
        self.address_family = family_of(address)
        super().__init__((address, ECHO_PORT), _EchoHandler)


# -- DNS -------------------------------------------------------------------------------------


class Zone:
    """Names to addresses; `*.example.test` answers for every name below example.test."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = {name.lower().rstrip("."): addresses for name, addresses in records.items()}

    def lookup(self, name: str) -> list[str] | None:
        name = name.lower().rstrip(".")
        if name in self.records:
            return self.records[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            wildcard = "*." + ".".join(labels[i:])
            if wildcard in self.records:
                return self.records[wildcard]
        return None

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for question in query.question:
            addresses = self.lookup(question.name.to_text())
            if addresses is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                continue
            version = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
            matching = [a for a in addresses if ipaddress.ip_address(a).version == version]
            if matching:
                response.answer.append(
                    dns.rrset.from_text_list(
                        question.name, 60, dns.rdataclass.IN, question.rdtype, matching
                    )
                )
        return response.to_wire()


def _question(wire: bytes) -> str:
    try:
        return " ".join(q.to_text() for q in dns.message.from_wire(wire).question)
    except Exception:  # a malformed query is reported as such, and answered with nothing
        return "<malformed>"


class _DNSUDPHandler(socketserver.BaseRequestHandler):
    server: _DNSUDPServer

    def handle(self) -> None:
        data, sock = self.request
        report(service="dns", transport="udp", address=self.server.server_address[0],
               client=self.client_address[0], question=_question(data))  # fmt: skip
        with contextlib.suppress(Exception):  # garbage gets no answer, as from a real server
            sock.sendto(self.server.zone.answer(data), self.client_address)


class _DNSTCPHandler(socketserver.BaseRequestHandler):
    server: _DNSTCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        while header := _read_exactly(sock, 2):
            data = _read_exactly(sock, struct.unpack("!H", header)[0])
            if data is None:
                return
            report(service="dns", transport="tcp", address=self.server.server_address[0],
                   client=self.client_address[0], question=_question(data))  # fmt: skip
            try:
                reply = self.server.zone.answer(data)
            except Exception:
                return
            sock.sendall(struct.pack("!H", len(reply)) + reply)


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _DNSUDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True

    def __init__(self, address: str, zone: Zone) -> None:
        self.address_family = family_of(address)
        self.zone = zone
        super().__init__((address, DNS_PORT), _DNSUDPHandler)


class _DNSTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: str, zone: Zone) -> None:
        self.address_family = family_of(address)
        self.zone = zone
        super().__init__((address, DNS_PORT), _DNSTCPHandler)


# -- the process -----------------------------------------------------------------------------


def main(spec: dict[str, Any]) -> None:
    zone = Zone(spec["zone"])
    servers: list[socketserver.BaseServer] = []
    for address, host_name in spec["http"].items():
        servers += [_HTTPServer(address, port, host_name) for port in HTTP_PORTS]
        servers.append(_EchoServer(address))
    for address in spec["dns"]:
        servers += [_DNSUDPServer(address, zone), _DNSTCPServer(address, zone)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    report(service="ready")
    sys.stdin.read()  # until the fixture closes our stdin (or dies): then exit


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
