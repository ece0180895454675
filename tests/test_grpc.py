"""Native gRPC, Connect over HTTP/2 and gRPC-Web on one port, as real clients see them:
grpcio (every service, the streaming calls, the error codes), grpcio-reflection's client,
grpcio-health-checking's Health stub, and curl. One server on pyvoy for the module;
one more for the graceful stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from corral import AsyncSandbox
from corral.client._config import ClientSettings
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.server import tls
from corral.v1 import (
    errors_pb2,
    jobs_pb2,
    sandbox_pb2,
    templates_pb2,
    vms_pb2,
    volumes_pb2,
)
from corral.v1 import (
    health_pb2 as corral_health,
)
from tests.conftest import LiveServer, start_server

PYVOY = {"CORRAL_HTTP_SERVER": "pyvoy"}
# Two Pythons start in turn (`corral server`, then the app in Envoy): on a busy machine,
# more than the 30 s other servers get.
READY = 90
M = TypeVar("M", bound=Message)


@pytest.fixture(scope="module")
def grpc_server(settings: Settings) -> Iterator[LiveServer]:
    live = start_server(
        settings,
        settings.runtime_dir / "grpc-data",
        pool_size=0,
        extra_env=PYVOY,
        ready_timeout=READY,
    )
    try:
        yield live
    finally:
        assert live.stop() == 0


@pytest.fixture(scope="module")
def channel(grpc_server: LiveServer) -> Iterator[Any]:
    with grpc.insecure_channel(grpc_server.url.removeprefix("http://")) as ch:
        yield ch


class Api:
    """grpcio calls of Corral's methods ("SandboxService/List") with a key."""

    def __init__(self, channel: Any, key: str | None) -> None:
        self.channel = channel
        self.metadata = [("authorization", f"Bearer {key}")] if key else []

    def _callable(self, kind: str, method: str, reply: type[Message]) -> Any:
        return getattr(self.channel, kind)(
            f"/corral.v1.{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )

    def unary(self, method: str, request: Message, reply: type[M]) -> M:
        answer: M = self._callable("unary_unary", method, reply)(
            request, metadata=self.metadata, timeout=60
        )
        return answer

    def stream(self, method: str, request: Message, reply: type[M]) -> Any:
        """The replies of a server-streaming call, as grpcio's iterator."""
        call = self._callable("unary_stream", method, reply)
        return call(request, metadata=self.metadata, timeout=120)

    def upload(self, method: str, requests: Sequence[Message], reply: type[M]) -> M:
        call = self._callable("stream_unary", method, reply)
        answer: M = call(iter(requests), metadata=self.metadata, timeout=60)
        return answer


def test_every_service_answers_native_grpc(grpc_server: LiveServer, channel: Any) -> None:
    api = Api(channel, grpc_server.key)
    for method, request, reply in [
        ("SandboxService/List", sandbox_pb2.ListRequest(), sandbox_pb2.ListResponse),
        ("JobService/List", jobs_pb2.ListJobsRequest(), jobs_pb2.ListJobsResponse),
        ("VolumeService/List", volumes_pb2.ListVolumesRequest(), volumes_pb2.ListVolumesResponse),
        (
            "TemplateService/List",
            templates_pb2.ListTemplatesRequest(),
            templates_pb2.ListTemplatesResponse,
        ),
        ("VmService/List", vms_pb2.ListVmsRequest(), vms_pb2.ListVmsResponse),
        ("HealthService/Check", corral_health.CheckRequest(), corral_health.CheckResponse),
    ]:
        assert isinstance(api.unary(method, request, reply), reply), method


def _details(error: grpc.RpcError) -> bytes:
    """The status details (a google.rpc.Status) of a gRPC error, as sent."""
    trailers = dict(error.trailing_metadata() or ())
    details: bytes = trailers["grpc-status-details-bin"]
    return details


def test_errors_have_the_codes_and_details_of_connect(
    grpc_server: LiveServer, channel: Any
) -> None:
    unknown_box = sandbox_pb2.GetRequest(sandbox_id="sb_0123456789abcdef0123")
    with pytest.raises(grpc.RpcError) as anonymous:
        Api(channel, None).unary("SandboxService/Get", unknown_box, sandbox_pb2.GetResponse)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Authorization: Bearer" in anonymous.value.details()
    # The ErrorDetail naming the class, as over Connect: the SDK raises the same class.
    named = errors_pb2.ErrorDetail(type="Unauthenticated").SerializeToString()
    assert b"type.googleapis.com/corral.v1.ErrorDetail" in _details(anonymous.value)
    assert named in _details(anonymous.value)
    api = Api(channel, grpc_server.key)
    with pytest.raises(grpc.RpcError) as unknown:
        api.unary("SandboxService/Get", unknown_box, sandbox_pb2.GetResponse)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as empty:
        api.unary("SandboxService/Get", sandbox_pb2.GetRequest(), sandbox_pb2.GetResponse)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    garbage = channel.unary_unary("/corral.v1.SandboxService/Get")  # bytes as they are
    with pytest.raises(grpc.RpcError) as malformed:
        garbage(b"\xff\xff\xff", metadata=api.metadata, timeout=30)
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unmarshal" in malformed.value.details()


def test_streams_over_grpc_server_and_client(
    grpc_server: LiveServer, channel: Any, sandbox_host: None
) -> None:
    api = Api(channel, grpc_server.key)
    created = api.unary(
        "SandboxService/Create",
        sandbox_pb2.CreateRequest(template="host"),
        sandbox_pb2.CreateResponse,
    )
    box = created.sandbox.id
    try:
        run = sandbox_pb2.ExecRequest(sandbox_id=box, cmd="echo hi; env")
        events = list(api.stream("SandboxService/Exec", run, sandbox_pb2.ExecResponse))
        output = b"".join(e.stdout for e in events)
        assert output.startswith(b"hi\n") and events[-1].end.reason == "exited"
        # pyvoy's variables for Envoy (libpython preloaded, its Python's home) stay there.
        assert b"LD_PRELOAD" not in output and b"PYTHONHOME" not in output

        chunks = [b"x" * 100_000, b"y" * 100_000]
        header = sandbox_pb2.WriteFileHeader(sandbox_id=box, path="/tmp/f")
        parts = [sandbox_pb2.WriteFileRequest(header=header)]
        parts += [sandbox_pb2.WriteFileRequest(data=chunk) for chunk in chunks]
        api.upload("SandboxService/WriteFile", parts, sandbox_pb2.WriteFileResponse)
        read = sandbox_pb2.ReadFileRequest(sandbox_id=box, path="/tmp/f")
        replies = api.stream("SandboxService/ReadFile", read, sandbox_pb2.ReadFileResponse)
        assert b"".join(m.data for m in replies) == b"".join(chunks)
    finally:
        kill = sandbox_pb2.KillRequest(sandbox_id=box)
        api.unary("SandboxService/Kill", kill, sandbox_pb2.KillResponse)


def test_a_jobs_logs_stream_over_grpc(
    grpc_server: LiveServer, channel: Any, sandbox_host: None
) -> None:
    api = Api(channel, grpc_server.key)
    spec = jobs_pb2.JobSpec(kind="shell", run="echo from-a-job", template="host")
    submit = jobs_pb2.SubmitJobRequest(spec=spec)
    job = api.unary("JobService/Submit", submit, jobs_pb2.SubmitJobResponse).job
    follow = jobs_pb2.StreamJobLogsRequest(job_id=job.id, follow=True)
    messages = list(api.stream("JobService/StreamLogs", follow, jobs_pb2.StreamJobLogsResponse))
    assert b"from-a-job" in b"".join(c.data for m in messages for c in m.chunks)
    assert messages[-1].HasField("final_state")


def test_reflection_lists_and_describes_every_service(channel: Any) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {
        "corral.v1.SandboxService",
        "corral.v1.JobService",
        "corral.v1.VolumeService",
        "corral.v1.TemplateService",
        "corral.v1.VmService",
        "corral.v1.HealthService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    } <= services
    pool = descriptor_pool.DescriptorPool(database)  # resolves imports through the server
    exec_ = pool.FindServiceByName("corral.v1.SandboxService").methods_by_name["Exec"]
    assert exec_.output_type.full_name == "corral.v1.ExecResponse"
    submit = pool.FindServiceByName("corral.v1.JobService").methods_by_name["Submit"]
    assert "spec" in submit.input_type.fields_by_name


def test_health_check_and_watch_need_no_key(channel: Any) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == serving
    named = health_pb2.HealthCheckRequest(service="corral.v1.SandboxService")
    assert health.Check(named, timeout=30).status == serving
    with pytest.raises(grpc.RpcError) as unknown:
        health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=30)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == serving
    watch.cancel()


def test_curl_speaks_connect_json_over_http2(grpc_server: LiveServer) -> None:
    """In clear text with prior knowledge (Envoy does not take curl's h2c upgrade, so
    `--http2` stays HTTP/1.1 here); over TLS `--http2` is ALPN's (the TLS test)."""
    flag = "--http2-prior-knowledge"
    result = subprocess.run(
        ["curl", "-sS", flag, "-w", "\n%{http_version}", "-H", "content-type: application/json",
         "-H", f"authorization: Bearer {grpc_server.key}", "-d", "{}",
         grpc_server.url + "/corral.v1.SandboxService/List"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    body, version = result.stdout.rsplit("\n", 1)
    assert version == "2"
    assert set(json.loads(body)) <= {"sandboxes", "nextPageToken"}  # a ListResponse


def test_grpc_web_and_connect_over_http1_still_work(grpc_server: LiveServer) -> None:
    web = httpx.post(
        grpc_server.url + "/corral.v1.HealthService/Check",
        content=b"\x00\x00\x00\x00\x00",
        headers={"Content-Type": "application/grpc-web+proto"},
    )
    assert web.status_code == 200 and b"grpc-status: 0" in web.content
    connect = httpx.post(
        grpc_server.url + "/grpc.health.v1.Health/Check",
        json={},
        headers={"Content-Type": "application/json"},
    )
    assert connect.status_code == 200 and connect.json() == {"status": "SERVING"}


def test_tls_on_pyvoy_then_sigterm_lets_an_open_stream_finish(settings: Settings) -> None:
    """One more server (TLS, self-signed): gRPC and Connect over HTTP/2 (ALPN) on its
    port, then a SIGTERM while a stream is open: it finishes, the server stops."""
    data = settings.runtime_dir / "grpc-tls"
    ca = data / "tls" / tls.SELF_SIGNED_CERT
    live = start_server(
        settings, data, pool_size=0, extra_env=PYVOY, ready_timeout=READY,
        args=("--tls-self-signed",), ca_file=ca,
    )  # fmt: skip
    try:
        assert live.url.startswith("https://")
        curl = subprocess.run(
            ["curl", "-sS", "--http2", "--cacert", str(ca), "-w", "\n%{http_version}",
             "-H", "content-type: application/json", "-d", "{}",
             live.url + "/grpc.health.v1.Health/Check"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        body, version = curl.stdout.rsplit("\n", 1)
        assert json.loads(body) == {"status": "SERVING"} and version == "2"
        credentials = grpc.ssl_channel_credentials(ca.read_bytes())
        with grpc.secure_channel(live.url.removeprefix("https://"), credentials) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == serving
            api = Api(ch, live.key)
            create = sandbox_pb2.CreateRequest(template="host", isolation="process")
            box = api.unary("SandboxService/Create", create, sandbox_pb2.CreateResponse).sandbox.id
            run = sandbox_pb2.ExecRequest(sandbox_id=box, cmd="echo start; sleep 2; echo done")
            stream = api.stream("SandboxService/Exec", run, sandbox_pb2.ExecResponse)
            assert next(stream).HasField("start")
            assert next(stream).stdout == b"start\n"
            os.kill(live.process.pid, signal.SIGTERM)
            rest = list(stream)
        assert b"done\n" in b"".join(e.stdout for e in rest) and rest[-1].end.reason == "exited"
        assert live.process.wait(timeout=60) == 0
        assert "server stopped" in live.log.read_text()
    finally:
        if live.process.poll() is None:
            live.stop(signal.SIGKILL)


async def test_the_sdk_speaks_native_grpc(
    grpc_server: LiveServer, sandbox_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_PROTOCOL", "grpc")
    assert ClientSettings.resolve(server=grpc_server.url).protocol == "grpc"
    async with await AsyncSandbox.create(server=grpc_server.url, api_key=grpc_server.key) as box:
        assert (await box.commands.run("echo over-grpc")).stdout == "over-grpc\n"
        await box.files.write("/tmp/up", b"z" * 300_000)  # a client stream
        assert await box.files.read("/tmp/up", format="bytes") == b"z" * 300_000


def connections_to(port: int) -> set[int]:
    """This process's established TCP connections to `port` on the loopback (their local
    ports), read from /proc: the server is another process on the same host."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[len("socket:[") : -1])
    found = set()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in ours:
            found.add(int(local.split(":")[1], 16))
    return found


async def test_the_sdks_sandboxes_share_one_http2_connection(
    grpc_server: LiveServer, sandbox_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create over gRPC opens no connection of its own (one did, and loaded the system's
    CAs with it: ~12 ms of each time to first command)."""
    monkeypatch.setenv("CORRAL_PROTOCOL", "grpc")
    port = int(grpc_server.url.rsplit(":", 1)[1])
    seen = []
    for _ in range(2):
        async with await AsyncSandbox.create(
            server=grpc_server.url, api_key=grpc_server.key
        ) as box:
            assert (await box.commands.run("echo shared")).stdout == "shared\n"
            seen.append(connections_to(port))
    assert seen[0] and seen[1] == seen[0]


def test_an_unknown_protocol_is_refused_naming_the_variable() -> None:
    with pytest.raises(InvalidRequest, match="CORRAL_PROTOCOL='h3' is unknown: use connect"):
        ClientSettings.resolve(server="http://127.0.0.1:1", environ={"CORRAL_PROTOCOL": "h3"})


def test_the_log_has_no_error_from_pyvoys_cancelled_receives(grpc_server: LiveServer) -> None:
    """Last in the module: after every call above, the server's log has none of the
    asyncio errors pyvoy causes on nearly every request (`corral.server.asgi`)."""
    log = grpc_server.log.read_text()
    assert "RecvFutureExecutor" not in log and '"level": "error"' not in log
