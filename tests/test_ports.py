"""Port exposure: a web app inside a sandbox (network "none"), reached through the server.

Both routing forms (`<port>-<id>.<domain>` and `/sandboxes/<id>/ports/<port>/`), the
traffic token in each of its places, refusals (no token, a wrong one, another sandbox's,
an unknown sandbox, a closed or bad port) that say why and never reach a service, bodies
streamed both ways, and a WebSocket round trip; then the SDK's and the CLI's URLs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest

from corral import Sandbox
from corral.config import Settings
from corral.errors import IsolationUnavailable, PortClosed, SandboxNotRunning
from tests.conftest import LiveServer, opts, start_server
from tests.kit import webapp
from tests.kit.polling import wait_until

if TYPE_CHECKING:
    from corral.isolation import Engine
    from corral.isolation import Sandbox as EngineSandbox

PORT = 8000

pytestmark = pytest.mark.usefixtures("sandbox_host")


def start_app(sbx: Sandbox, port: int = PORT) -> None:
    """The web app of `tests.kit.webapp` listening on 127.0.0.1:`port` in the sandbox."""
    sbx.files.write("webapp.py", webapp.SOURCE)
    sbx.commands.run(f"python3 /workspace/webapp.py {port}", background=True)
    url = sbx.get_url(port)
    wait_until(lambda: httpx.get(url).status_code == 200, f"the web app on port {port}")


@pytest.fixture(scope="module")
def web(server: LiveServer) -> Iterator[Sandbox]:
    """A sandbox serving the web app; its ports need its token."""
    with Sandbox.create(timeout=300, **opts(server)) as sbx:
        start_app(sbx)
        yield sbx


@pytest.fixture(scope="module")
def other(server: LiveServer) -> Iterator[Sandbox]:
    """Another sandbox serving the web app on the same port."""
    with Sandbox.create(timeout=300, **opts(server)) as sbx:
        start_app(sbx)
        yield sbx


def path_url(server: LiveServer, sandbox_id: str, port: int | str, rest: str = "/") -> str:
    return f"{server.url}/sandboxes/{sandbox_id}/ports/{port}{rest}"


def host_of(server: LiveServer, sandbox_id: str, port: int | str) -> str:
    return f"{port}-{sandbox_id}.localhost:{urlsplit(server.url).port}"


def refusal(response: httpx.Response, status: int, *words: str) -> None:
    """`response` is the proxy's own short JSON refusal, with a message naming `words`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"}, body
    for word in words:
        assert word in body["message"], body


def test_http_through_both_forms_with_the_token(server: LiveServer, web: Sandbox) -> None:
    token = web.traffic_token
    assert token and web.info.ports_domain == "localhost" and not web.info.public_ports
    by_path = httpx.get(
        path_url(server, web.sandbox_id, PORT, "/some/page?a=1&b=two"),
        headers={"X-Corral-Traffic-Token": token, "X-App": "kept"},
    )
    assert by_path.status_code == 200, by_path.text
    seen = by_path.json()
    # The prefix is stripped, the query kept, the token never forwarded.
    assert seen["path"] == "/some/page?a=1&b=two"
    assert seen["headers"]["x-app"] == "kept"
    assert "x-corral-traffic-token" not in seen["headers"]
    assert seen["headers"]["x-forwarded-prefix"] == f"/sandboxes/{web.sandbox_id}/ports/{PORT}"

    # The token as a query parameter (what a browser can carry) is removed too.
    in_query = httpx.get(path_url(server, web.sandbox_id, PORT, f"/q?corral_token={token}&x=1"))
    assert in_query.status_code == 200 and in_query.json()["path"] == "/q?x=1"

    # E2B's host form, and E2B's header name.
    host = host_of(server, web.sandbox_id, PORT)
    by_host = httpx.get(
        f"{server.url}/any/path?z=9",
        headers={"Host": host, "e2b-traffic-access-token": token},
    )
    assert by_host.status_code == 200, by_host.text
    assert by_host.json()["path"] == "/any/path?z=9"
    assert by_host.json()["headers"]["host"] == host
    assert "e2b-traffic-access-token" not in by_host.json()["headers"]
    # Even an API path on a port's host name is the sandbox's, not the API's.
    api_path = httpx.post(
        f"{server.url}/corral.v1.SandboxService/List",
        headers={"Host": host, "X-Corral-Traffic-Token": token},
        content=b"{}",
    )
    assert api_path.json()["path"] == "/corral.v1.SandboxService/List"

    # Any method; HEAD has no body.
    for method in ("PUT", "DELETE", "PATCH"):
        answer = httpx.request(method, web.get_url(PORT, "/m"), content=b"x")
        assert answer.json()["method"] == method and answer.json()["length"] == 1
    head = httpx.head(web.get_url(PORT, "/h"))
    assert head.status_code == 200 and head.content == b""


def test_bodies_stream_both_ways(web: Sandbox) -> None:
    data = secrets.token_bytes(5 << 20)

    def chunks() -> Iterator[bytes]:  # no length: sent chunked, as it comes
        for i in range(0, len(data), 1 << 16):
            yield data[i : i + (1 << 16)]

    upload = httpx.post(web.get_url(PORT, "/up"), content=chunks(), timeout=60)
    assert upload.status_code == 200, upload.text
    assert upload.json()["length"] == len(data)
    assert upload.json()["sha256"] == hashlib.sha256(data).hexdigest()
    sized = httpx.post(web.get_url(PORT, "/up"), content=data, timeout=60)
    assert sized.json()["sha256"] == hashlib.sha256(data).hexdigest()

    with httpx.stream("GET", web.get_url(PORT, "/stream?n=200")) as streamed:
        assert streamed.status_code == 200
        lines = list(streamed.iter_lines())
    assert lines == [f"chunk {i}" for i in range(200)]


def test_a_client_leaving_ends_the_stream_from_the_sandbox(web: Sandbox) -> None:
    """A client that stops reading an endless response (server-sent events, a log tail)
    ends the proxy's connection into the sandbox: its server sees the write fail."""
    mark = f"/tmp/left-{secrets.token_hex(4)}"
    with httpx.stream("GET", web.get_url(PORT, f"/forever?mark={mark}")) as endless:
        lines = endless.iter_lines()
        assert [next(lines) for _ in range(3)] == ["chunk 0", "chunk 1", "chunk 2"]
    wait_until(lambda: web.files.exists(mark), "the sandbox's server to see the client leave")


def test_kept_connections_closed_by_the_sandbox_are_replaced(web: Sandbox) -> None:
    """The proxy keeps connections into a sandbox for the next request; one its server
    has closed meanwhile costs the client nothing."""
    with httpx.Client() as client:
        for i in range(20):
            bye = client.get(web.get_url(PORT, f"/bye?{i}"))
            assert bye.status_code == 200 and bye.json()["path"] == f"/bye?{i}"
            after = client.get(web.get_url(PORT, f"/after?{i}"))
            assert after.status_code == 200 and after.json()["path"] == f"/after?{i}"
            # A request with a body (which could not be sent again) is never put on a
            # kept connection.
            client.get(web.get_url(PORT, "/bye"))
            posted = client.post(web.get_url(PORT, "/post"), content=b"body")
            assert posted.status_code == 200 and posted.json()["length"] == 4


def test_refusals_say_why_and_never_reach_another_sandbox(
    server: LiveServer, web: Sandbox, other: Sandbox
) -> None:
    url = path_url(server, web.sandbox_id, PORT, "/")
    refusal(httpx.get(url), 401, "traffic access token", "X-Corral-Traffic-Token")
    refusal(httpx.get(url, headers={"X-Corral-Traffic-Token": "nope"}), 403, "wrong")
    refusal(httpx.get(url + "?corral_token=nope"), 403, "wrong")
    # Each sandbox's token opens its own ports only, in either form, even when the proxy
    # keeps a connection into that port from an earlier request.
    assert httpx.get(web.get_url(PORT)).status_code == 200
    refusal(httpx.get(url, headers={"X-Corral-Traffic-Token": other.traffic_token}), 403)
    host = host_of(server, web.sandbox_id, PORT)
    refusal(httpx.get(server.url, headers={"Host": host, "X-Corral-Traffic-Token": "x"}), 403)
    refusal(httpx.get(server.url, headers={"Host": host}), 401)
    assert httpx.get(other.get_url(PORT)).status_code == 200
    # An API key is no traffic token.
    refusal(httpx.get(url, headers={"Authorization": f"Bearer {server.key}"}), 401)


def test_unknown_sandbox_closed_port_and_bad_ports(server: LiveServer, web: Sandbox) -> None:
    refusal(httpx.get(path_url(server, "sb_" + "0" * 20, PORT)), 404, "no sandbox")
    unknown_host = {"Host": host_of(server, "sb_" + "0" * 20, PORT)}
    refusal(httpx.get(server.url, headers=unknown_host), 404)
    refusal(httpx.get(web.get_url(8001)), 502, "nothing listens on port 8001")
    for bad in ("0", "65536", "http", "-1"):
        refusal(httpx.get(path_url(server, web.sandbox_id, bad)), 400, "not a TCP port")
    for bad in ("0", "65536"):
        bad_host = {"Host": f"{bad}-{web.sandbox_id}.localhost"}
        refusal(httpx.get(server.url, headers=bad_host), 400, "not a TCP port")
    # A host name under the domain that names no port is the API's.
    api_host = {"Host": f"corral-dev.localhost:{urlsplit(server.url).port}"}
    assert httpx.get(f"{server.url}/healthz", headers=api_host).json()["status"] == "serving"
    # Other paths under /sandboxes/<id>/ are E2B's API (corral.server.e2b), which knows
    # no such one and says what a port's URL is.
    refusal(httpx.get(f"{server.url}/sandboxes/{web.sandbox_id}/nope/8000/"), 404, "/ports/")
    # The API is still the API (a host that is not a port's, a path not under /sandboxes/).
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "serving"


def test_public_ports_need_no_token(server: LiveServer) -> None:
    with Sandbox.create(timeout=120, public_ports=True, **opts(server)) as sbx:
        assert sbx.info.public_ports and sbx.traffic_token == ""
        start_app(sbx)
        assert "corral_token" not in sbx.get_url(PORT)
        assert httpx.get(path_url(server, sbx.sandbox_id, PORT)).status_code == 200
        host = {"Host": host_of(server, sbx.sandbox_id, PORT)}
        assert httpx.get(server.url, headers=host).status_code == 200
        refusal(httpx.get(sbx.get_url(8001)), 502)


def websocket_open(server: LiveServer, target: str, headers: dict[str, str]) -> socket.socket:
    """A raw client connection to the server that has sent a WebSocket upgrade request."""
    netloc = urlsplit(server.url)
    sock = socket.create_connection((netloc.hostname, netloc.port), timeout=30)
    host = headers.pop("Host", netloc.netloc)
    sock.sendall(webapp.upgrade_request(host, target, headers))
    return sock


def test_websocket_round_trip(server: LiveServer, web: Sandbox) -> None:
    target = f"/sandboxes/{web.sandbox_id}/ports/{PORT}/ws?corral_token={web.traffic_token}"
    by_host = {
        "Host": host_of(server, web.sandbox_id, PORT),
        "X-Corral-Traffic-Token": web.traffic_token,
    }
    for sock in (websocket_open(server, target, {}), websocket_open(server, "/ws", by_host)):
        with sock, sock.makefile("rb") as stream:
            status, headers = webapp.read_head(stream)
            assert status == 101 and headers["upgrade"].lower() == "websocket"
            for message in (b"hello", secrets.token_bytes(70_000)):  # one long: 64-bit length
                opcode = 1 if message == b"hello" else 2
                sock.sendall(webapp.frame(opcode, message, mask=os.urandom(4)))
                assert webapp.read_frame(stream) == (opcode, message)
            sock.sendall(webapp.frame(8, b"\x03\xe8", mask=os.urandom(4)))
            assert webapp.read_frame(stream) == (8, b"\x03\xe8")


def test_a_server_shutting_down_ends_its_websocket_relays(settings: Settings) -> None:
    """A graceful shutdown closes relayed WebSockets instead of waiting for them (its
    grace here is a minute: the stop below would kill it first)."""
    data_dir = settings.runtime_dir / f"ports-{secrets.token_hex(4)}"
    live = start_server(settings, data_dir, pool_size=0, extra_env={"CORRAL_SHUTDOWN_GRACE": "60"})
    try:
        sbx = Sandbox.create(timeout=120, **opts(live))  # the shutdown kills it
        # Started in a session of its own by a command that ends: no call stays open
        # (a background command's output stream would hold the shutdown by itself).
        sbx.files.write("webapp.py", webapp.SOURCE)
        sbx.commands.run(f"setsid -f python3 /workspace/webapp.py {PORT}")
        url = sbx.get_url(PORT)
        wait_until(lambda: httpx.get(url).status_code == 200, "the web app")
        target = f"/sandboxes/{sbx.sandbox_id}/ports/{PORT}/ws?corral_token={sbx.traffic_token}"
        with websocket_open(live, target, {}) as sock, sock.makefile("rb") as stream:
            assert webapp.read_head(stream)[0] == 101
            sock.sendall(webapp.frame(1, b"still here", mask=os.urandom(4)))
            assert webapp.read_frame(stream) == (1, b"still here")
            sbx.close()
            assert live.stop(timeout=30) == 0
            assert stream.read() == b""  # the relay was closed, not left hanging
    finally:
        live.stop()


def test_websocket_refusals(server: LiveServer, web: Sandbox, other: Sandbox) -> None:
    base = f"/sandboxes/{web.sandbox_id}/ports"
    cases: list[tuple[str, dict[str, str], int]] = [
        (f"{base}/{PORT}/ws", {}, 401),
        (f"{base}/{PORT}/ws?corral_token={other.traffic_token}", {}, 403),
        (f"/sandboxes/sb_{'0' * 20}/ports/{PORT}/ws", {}, 404),
        (f"{base}/8001/ws?corral_token={web.traffic_token}", {}, 502),
        (f"{base}/0/ws", {}, 400),
        ("/healthz", {}, 404),  # the API speaks no WebSocket
    ]
    for target, headers, status in cases:
        with websocket_open(server, target, headers) as sock, sock.makefile("rb") as stream:
            got, found = webapp.read_head(stream)
            body = json.loads(stream.read(int(found["content-length"])))
            assert got == status and body["message"], (target, got, body)


def test_sdk_and_cli_give_usable_urls(server: LiveServer, web: Sandbox) -> None:
    server_port = urlsplit(server.url).port
    assert web.get_host(PORT) == f"{PORT}-{web.sandbox_id}.localhost:{server_port}"
    assert httpx.get(web.get_url(PORT, "/x?y=1")).json()["path"] == "/x?y=1"
    host_url = web.get_url(PORT, host_form=True)
    assert urlsplit(host_url).netloc == web.get_host(PORT)

    done = server.corral("sandbox", "url", web.sandbox_id, str(PORT))
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url == web.get_url(PORT)
    assert httpx.get(url).json()["path"] == "/"
    done = server.corral("sandbox", "url", web.sandbox_id, str(PORT), "--host-form")
    assert done.returncode == 0 and done.stdout.strip() == host_url
    done = server.corral("sandbox", "url", web.sandbox_id, "70000")
    assert done.returncode != 0 and "not a TCP port" in done.stderr

    done = server.corral("sandbox", "create", "--public-ports", "--timeout", "60", "-o", "json")
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    try:
        assert created["public_ports"] is True and created["traffic_token"] == ""
        assert created["ports_domain"] == "localhost"
    finally:
        server.corral("sandbox", "kill", created["sandbox_id"])


def test_paused_and_killed_sandboxes(server: LiveServer) -> None:
    with Sandbox.create(timeout=120, **opts(server)) as sbx:
        start_app(sbx)
        sbx.pause()
        refusal(httpx.get(sbx.get_url(PORT)), 409, "paused", "resume")
        refusal(httpx.get(sbx.get_url(PORT).split("?")[0]), 401)  # the token comes first
        sbx.resume()
        assert httpx.get(sbx.get_url(PORT)).status_code == 200
        url = sbx.get_url(PORT)
    refusal(httpx.get(url), 404, "no sandbox")


# -- the byte path, in the engine ---------------------------------------------------------

ONE_ANSWER = (  # PORT WORD [HOST]: answers WORD to each connection
    "import socket, sys\n"
    "host = sys.argv[3] if len(sys.argv) > 3 else '127.0.0.1'\n"
    "s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)\n"
    "s.bind((host, int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()\n"
)


async def listen(box: EngineSandbox, program: str, *args: str) -> None:
    started = await box.exec(["python3", "-c", program, *args], background=True)
    async for chunk in started:
        if b"listening" in chunk.data:
            return


async def test_open_port_reaches_the_sandboxs_own_loopback_only(
    engine: Engine, sandbox: EngineSandbox
) -> None:
    with pytest.raises(PortClosed, match="nothing listens on port 9000"):
        await sandbox.open_port(9000)
    other = await engine.create(isolation="namespace")
    try:
        for box, word in ((sandbox, "mine"), (other, "other")):
            await listen(box, ONE_ANSWER, "9000", word)
        for box, word in ((sandbox, "mine"), (other, "other")):
            sock = await box.open_port(9000)
            reader, writer = await asyncio.open_connection(sock=sock)
            assert await reader.read() == word.encode()
            writer.close()
        await sandbox.pause()
        with pytest.raises(SandboxNotRunning, match="paused"):
            await sandbox.open_port(9000)
        await sandbox.resume()
    finally:
        await other.destroy()
    with pytest.raises(SandboxNotRunning):
        await other.open_port(9000)


async def test_a_sandbox_without_its_own_network_namespace_exposes_nothing(
    engine: Engine,
) -> None:
    box = await engine.create(isolation="process")
    try:
        with pytest.raises(IsolationUnavailable, match="no network namespace of its own"):
            await box.open_port(9000)
    finally:
        await box.destroy()


def test_without_root_the_host_cannot_enter_a_namespace() -> None:
    """Why `open_port` falls back to the guest agent without root: setns needs
    CAP_SYS_ADMIN, and `connect_port` says so with PermissionError."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged uid")
    script = (
        "import asyncio, os\n"
        "from corral.isolation.port_socket import connect_port\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "fd = os.open('/proc/self/ns/net', os.O_RDONLY)\n"
        "try:\n"
        "    asyncio.run(connect_port(fd, 9, where='sandbox x'))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "PermissionError", (done.stdout, done.stderr)


ECHO = (
    "import socket, sys\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    while data := c.recv(65536):\n"
    "        c.sendall(data)\n"
    "    c.close()\n"
)


async def test_the_guest_agent_relays_a_port_when_the_host_cannot_enter(
    sandbox: EngineSandbox,
) -> None:
    """The path without root (and for tiers whose network the host cannot enter): the
    agent connects inside the sandbox; bytes go both ways with flow control."""
    with pytest.raises(PortClosed, match="nothing listens on port 9000"):
        await sandbox.open_port_via_agent(9000)
    await listen(sandbox, ECHO, "9000")
    data = secrets.token_bytes(3 << 20)  # well past the channel's window, both ways
    sock = await sandbox.open_port_via_agent(9000)
    reader, writer = await asyncio.open_connection(sock=sock)

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()  # the echo server ends after the last byte

    sending = asyncio.create_task(send())
    assert await reader.read() == data  # all of it, then the end
    await sending
    writer.close()

    await listen(sandbox, ONE_ANSWER, "9001", "hello")
    for _ in range(20):  # one after another: each ends cleanly
        sock = await sandbox.open_port_via_agent(9001)
        reader, writer = await asyncio.open_connection(sock=sock)
        assert await reader.read() == b"hello"
        writer.close()


async def test_a_server_on_ipv6_loopback_alone_is_reached(sandbox: EngineSandbox) -> None:
    """Node and Vite dev servers on "localhost" may listen on ::1 only."""
    await listen(sandbox, ONE_ANSWER, "9002", "six", "::1")
    for opened in (sandbox.open_port, sandbox.open_port_via_agent):
        sock = await opened(9002)
        reader, writer = await asyncio.open_connection(sock=sock)
        assert await reader.read() == b"six"
        writer.close()
        with pytest.raises(PortClosed, match="nothing listens on port 9003"):
            await opened(9003)
