from protos.nnoc.v1 import bundle_pb2 as _bundle_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeRequest(_message.Message):
    __slots__ = ("fleet", "device_id", "current_version")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    device_id: str
    current_version: int
    def __init__(self, fleet: _Optional[str] = ..., device_id: _Optional[str] = ..., current_version: _Optional[int] = ...) -> None: ...

class VersionNotice(_message.Message):
    __slots__ = ("fleet", "version", "manifest", "rollback")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    version: int
    manifest: _bundle_pb2.Manifest
    rollback: bool
    def __init__(self, fleet: _Optional[str] = ..., version: _Optional[int] = ..., manifest: _Optional[_Union[_bundle_pb2.Manifest, _Mapping]] = ..., rollback: _Optional[bool] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("fleet", "version", "name", "offset")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    version: int
    name: str
    offset: int
    def __init__(self, fleet: _Optional[str] = ..., version: _Optional[int] = ..., name: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...
