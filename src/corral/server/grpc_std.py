"""The two standard gRPC services every gRPC tool expects, served on the API's port:

- `grpc.health.v1.Health` (Check and Watch) for load balancers and orchestrators: SERVING
  once the server has started (its sandbox manager runs), NOT_SERVING while it starts or
  stops. It needs no key: a load balancer has none.
- gRPC server reflection (`grpc.reflection.v1` and `v1alpha`, connectrpc-grpcreflect), so
  `grpcurl`, `buf curl` or grpcio's reflection client list and call Corral's services
  without its proto files. It needs no key either: it tells only the schema, which is
  public (proto/ in the repository), and a tool must read the schema before it can even
  send the key.

Health's messages are built here from a descriptor in a pool of their own, not generated
into Google protobuf's default pool: a process that also loads grpcio-health-checking's
module (a test, a client beside the server) would find `grpc.health.v1` defined twice there.
connectrpc-grpcreflect reads protobuf-py descriptors; `_reflected` converts Google's.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from connectrpc_grpcreflect import (  # type: ignore[import-untyped]
    ServerReflectionAlphaASGIApplication,
    ServerReflectionAlphaService,
    ServerReflectionASGIApplication,
    ServerReflectionService,
)
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from protobuf import DescFile, merge_from_binary
from protobuf._file_registry import create_file_registry
from protobuf.wkt import FileDescriptorProto

from corral.server.requests import CODECS

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
# How often Watch looks at the server's state: a load balancer needs seconds, not ms.
WATCH_INTERVAL = 1.0


def _health_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/health/v1/health.proto (https://github.com/grpc/grpc-proto), as a descriptor."""
    f = descriptor_pb2.FileDescriptorProto(
        name="grpc/health/v1/health.proto", package="grpc.health.v1", syntax="proto3"
    )
    f.message_type.add(name="HealthCheckRequest").field.add(
        name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, json_name="service",
    )  # fmt: skip
    response = f.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")):
        status.value.add(name=name, number=number)
    response.field.add(
        name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, json_name="status",
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
    )  # fmt: skip
    service = f.service.add(name="Health")
    for name, streaming in (("Check", False), ("Watch", True)):
        service.method.add(
            name=name, input_type=".grpc.health.v1.HealthCheckRequest",
            output_type=".grpc.health.v1.HealthCheckResponse", server_streaming=streaming,
        )  # fmt: skip
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_health_file())
_HEALTH: FileDescriptor = _POOL.FindFileByName("grpc/health/v1/health.proto")
HealthCheckRequest: Any = message_factory.GetMessageClass(
    _HEALTH.message_types_by_name["HealthCheckRequest"]
)
HealthCheckResponse: Any = message_factory.GetMessageClass(
    _HEALTH.message_types_by_name["HealthCheckResponse"]
)
SERVING = 1
NOT_SERVING = 2


class GrpcHealth:
    """Check and Watch of `grpc.health.v1.Health`. `serving` says whether the server
    serves; `services` are the names a request may ask about ("" is the whole server)."""

    def __init__(self, serving: Callable[[], bool], services: tuple[str, ...]) -> None:
        self._serving = serving
        self._services = {"", *services}

    def _status(self, request: Any) -> int:
        if request.service not in self._services:
            raise ConnectError(Code.NOT_FOUND, f"no service {request.service!r} here")
        return SERVING if self._serving() else NOT_SERVING

    async def check(self, request: Any, ctx: RequestContext[Any, Any]) -> Any:
        return HealthCheckResponse(status=self._status(request))

    async def watch(self, request: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        last = None
        while True:
            status = self._status(request)
            if status != last:
                yield HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL)


def _method(name: str, stream: StreamType) -> MethodInfo[Any, Any]:
    return MethodInfo(
        name=name,
        service_name="grpc.health.v1.Health",
        input=HealthCheckRequest,
        output=HealthCheckResponse,
        idempotency_level=IdempotencyLevel.UNKNOWN,
        stream_type=stream,
    )


class GrpcHealthASGIApplication(ConnectASGIApplication[GrpcHealth]):
    """What protoc-gen-connectrpc would generate for health.proto."""

    def __init__(self, service: GrpcHealth, *, read_max_bytes: int) -> None:
        super().__init__(
            service=service,
            endpoints=lambda svc: {
                HEALTH_PREFIX + "Check": Endpoint.unary(
                    method=_method("Check", StreamType.UNARY), function=svc.check
                ),
                HEALTH_PREFIX + "Watch": Endpoint.server_stream(
                    method=_method("Watch", StreamType.SERVER_STREAM), function=svc.watch
                ),
            },
            read_max_bytes=read_max_bytes,
            compressions=(),
            codecs=CODECS,
        )

    @property
    def path(self) -> str:
        return HEALTH_PREFIX.rstrip("/")


def _reflected(files: list[FileDescriptor]) -> list[DescFile]:
    """protobuf-py's descriptors of Google protobuf's `files` (and of their imports)."""

    def convert(name: str) -> DescFile | FileDescriptorProto:
        if name.startswith("google/protobuf/"):  # protobuf-py ships the well-known types
            module = "protobuf.wkt." + name.removesuffix(".proto").replace("/", ".") + "_pb"
            desc: DescFile = importlib.import_module(module).desc()
            return desc
        google = descriptor_pb2.FileDescriptorProto()
        by_name = {f.name: f for f in files}
        pool_file = by_name.get(name) or descriptor_pool.Default().FindFileByName(name)
        pool_file.CopyToProto(google)
        out = FileDescriptorProto()
        merge_from_binary(out, google.SerializeToString())
        return out

    converted = []
    for f in files:
        proto = convert(f.name)
        assert isinstance(proto, FileDescriptorProto)
        desc = create_file_registry(proto, convert).file(f.name)
        assert desc is not None
        converted.append(desc)
    return converted


def reflection_apps(files: list[FileDescriptor]) -> list[Any]:
    """The reflection services (v1 and v1alpha) listing the services of `files` and
    health's."""
    descs = _reflected([*files, _HEALTH])
    return [
        # Their messages are protobuf-py's: connectrpc's default codecs, not `CODECS`.
        ServerReflectionASGIApplication(ServerReflectionService(*descs)),
        ServerReflectionAlphaASGIApplication(ServerReflectionAlphaService(*descs)),
    ]
