from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorDetail(_message.Message):
    __slots__ = ("type", "retry_after_seconds")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    type: str
    retry_after_seconds: float
    def __init__(self, type: _Optional[str] = ..., retry_after_seconds: _Optional[float] = ...) -> None: ...
