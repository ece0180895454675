import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from corral.v1 import jobs_pb2 as _jobs_pb2
from corral.v1 import sandbox_pb2 as _sandbox_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TemplateState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEMPLATE_STATE_UNSPECIFIED: _ClassVar[TemplateState]
    TEMPLATE_STATE_BUILDING: _ClassVar[TemplateState]
    TEMPLATE_STATE_READY: _ClassVar[TemplateState]
    TEMPLATE_STATE_FAILED: _ClassVar[TemplateState]
    TEMPLATE_STATE_CANCELLED: _ClassVar[TemplateState]
TEMPLATE_STATE_UNSPECIFIED: TemplateState
TEMPLATE_STATE_BUILDING: TemplateState
TEMPLATE_STATE_READY: TemplateState
TEMPLATE_STATE_FAILED: TemplateState
TEMPLATE_STATE_CANCELLED: TemplateState

class Template(_message.Message):
    __slots__ = ("team", "name", "state", "source", "layers", "env", "workdir", "user", "start_cmd", "ready_cmd", "size_bytes", "build_job_id", "steps_total", "steps_cached", "error", "created_at", "updated_at", "sandbox_limits", "sandbox_network", "memory_images")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEAM_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    START_CMD_FIELD_NUMBER: _ClassVar[int]
    READY_CMD_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUILD_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_CACHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_LIMITS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_NETWORK_FIELD_NUMBER: _ClassVar[int]
    MEMORY_IMAGES_FIELD_NUMBER: _ClassVar[int]
    team: str
    name: str
    state: TemplateState
    source: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    workdir: str
    user: str
    start_cmd: str
    ready_cmd: str
    size_bytes: int
    build_job_id: str
    steps_total: int
    steps_cached: int
    error: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    sandbox_limits: _sandbox_pb2.Limits
    sandbox_network: _sandbox_pb2.NetworkPolicy
    memory_images: _containers.RepeatedCompositeFieldContainer[MemoryImage]
    def __init__(self, team: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[TemplateState, str]] = ..., source: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., workdir: _Optional[str] = ..., user: _Optional[str] = ..., start_cmd: _Optional[str] = ..., ready_cmd: _Optional[str] = ..., size_bytes: _Optional[int] = ..., build_job_id: _Optional[str] = ..., steps_total: _Optional[int] = ..., steps_cached: _Optional[int] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sandbox_limits: _Optional[_Union[_sandbox_pb2.Limits, _Mapping]] = ..., sandbox_network: _Optional[_Union[_sandbox_pb2.NetworkPolicy, _Mapping]] = ..., memory_images: _Optional[_Iterable[_Union[MemoryImage, _Mapping]]] = ...) -> None: ...

class MemoryImage(_message.Message):
    __slots__ = ("isolation", "memory_mib", "cpu", "network", "ram_disk", "size_bytes", "created_at")
    ISOLATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MIB_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    RAM_DISK_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    isolation: str
    memory_mib: int
    cpu: float
    network: str
    ram_disk: bool
    size_bytes: int
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, isolation: _Optional[str] = ..., memory_mib: _Optional[int] = ..., cpu: _Optional[float] = ..., network: _Optional[str] = ..., ram_disk: _Optional[bool] = ..., size_bytes: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ImageSource(_message.Message):
    __slots__ = ("reference", "username", "password")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    reference: str
    username: str
    password: str
    def __init__(self, reference: _Optional[str] = ..., username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class DebianSource(_message.Message):
    __slots__ = ("suite", "variant", "packages")
    SUITE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    suite: str
    variant: str
    packages: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, suite: _Optional[str] = ..., variant: _Optional[str] = ..., packages: _Optional[_Iterable[str]] = ...) -> None: ...

class BuildTemplateRequest(_message.Message):
    __slots__ = ("name", "dockerfile", "recipe", "e2b_template", "image", "debian", "context", "build_args", "network", "ready_cmd", "ready_timeout_seconds", "sandbox_limits", "sandbox_network")
    class BuildArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOCKERFILE_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    E2B_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DEBIAN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BUILD_ARGS_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    READY_CMD_FIELD_NUMBER: _ClassVar[int]
    READY_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_LIMITS_FIELD_NUMBER: _ClassVar[int]
    SANDBOX_NETWORK_FIELD_NUMBER: _ClassVar[int]
    name: str
    dockerfile: str
    recipe: str
    e2b_template: str
    image: ImageSource
    debian: DebianSource
    context: bytes
    build_args: _containers.ScalarMap[str, str]
    network: _sandbox_pb2.NetworkPolicy
    ready_cmd: str
    ready_timeout_seconds: float
    sandbox_limits: _sandbox_pb2.Limits
    sandbox_network: _sandbox_pb2.NetworkPolicy
    def __init__(self, name: _Optional[str] = ..., dockerfile: _Optional[str] = ..., recipe: _Optional[str] = ..., e2b_template: _Optional[str] = ..., image: _Optional[_Union[ImageSource, _Mapping]] = ..., debian: _Optional[_Union[DebianSource, _Mapping]] = ..., context: _Optional[bytes] = ..., build_args: _Optional[_Mapping[str, str]] = ..., network: _Optional[_Union[_sandbox_pb2.NetworkPolicy, _Mapping]] = ..., ready_cmd: _Optional[str] = ..., ready_timeout_seconds: _Optional[float] = ..., sandbox_limits: _Optional[_Union[_sandbox_pb2.Limits, _Mapping]] = ..., sandbox_network: _Optional[_Union[_sandbox_pb2.NetworkPolicy, _Mapping]] = ...) -> None: ...

class BuildTemplateResponse(_message.Message):
    __slots__ = ("template",)
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    template: Template
    def __init__(self, template: _Optional[_Union[Template, _Mapping]] = ...) -> None: ...

class GetTemplateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetTemplateResponse(_message.Message):
    __slots__ = ("template",)
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    template: Template
    def __init__(self, template: _Optional[_Union[Template, _Mapping]] = ...) -> None: ...

class ListTemplatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTemplatesResponse(_message.Message):
    __slots__ = ("templates",)
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    templates: _containers.RepeatedCompositeFieldContainer[Template]
    def __init__(self, templates: _Optional[_Iterable[_Union[Template, _Mapping]]] = ...) -> None: ...

class DeleteTemplateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTemplateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamBuildLogsRequest(_message.Message):
    __slots__ = ("name", "offset", "event_offset", "follow")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    event_offset: int
    follow: bool
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., event_offset: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class StreamBuildLogsResponse(_message.Message):
    __slots__ = ("chunks", "events", "step_labels", "final_state")
    class StepLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: str
        def __init__(self, key: _Optional[int] = ..., value: _Optional[str] = ...) -> None: ...
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_LABELS_FIELD_NUMBER: _ClassVar[int]
    FINAL_STATE_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[_jobs_pb2.LogChunk]
    events: _containers.RepeatedCompositeFieldContainer[_jobs_pb2.JobEvent]
    step_labels: _containers.ScalarMap[int, str]
    final_state: TemplateState
    def __init__(self, chunks: _Optional[_Iterable[_Union[_jobs_pb2.LogChunk, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_jobs_pb2.JobEvent, _Mapping]]] = ..., step_labels: _Optional[_Mapping[int, str]] = ..., final_state: _Optional[_Union[TemplateState, str]] = ...) -> None: ...

class SnapshotSandboxRequest(_message.Message):
    __slots__ = ("sandbox_id", "name", "flatten")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    name: str
    flatten: bool
    def __init__(self, sandbox_id: _Optional[str] = ..., name: _Optional[str] = ..., flatten: _Optional[bool] = ...) -> None: ...

class SnapshotSandboxResponse(_message.Message):
    __slots__ = ("template",)
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    template: Template
    def __init__(self, template: _Optional[_Union[Template, _Mapping]] = ...) -> None: ...

class CancelBuildRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CancelBuildResponse(_message.Message):
    __slots__ = ("template",)
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    template: Template
    def __init__(self, template: _Optional[_Union[Template, _Mapping]] = ...) -> None: ...
