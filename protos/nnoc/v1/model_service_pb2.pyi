from protos.nnoc.v1 import bundle_pb2 as _bundle_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
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
    __slots__ = ("fleet", "version", "manifest", "rollback", "rollback_order")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_ORDER_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    version: int
    manifest: _bundle_pb2.Manifest
    rollback: bool
    rollback_order: _bundle_pb2.Signature
    def __init__(self, fleet: _Optional[str] = ..., version: _Optional[int] = ..., manifest: _Optional[_Union[_bundle_pb2.Manifest, _Mapping]] = ..., rollback: _Optional[bool] = ..., rollback_order: _Optional[_Union[_bundle_pb2.Signature, _Mapping]] = ...) -> None: ...

class RollbackOrder(_message.Message):
    __slots__ = ("fleet", "version", "from_version", "issued_at", "expires_at")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    version: int
    from_version: int
    issued_at: float
    expires_at: float
    def __init__(self, fleet: _Optional[str] = ..., version: _Optional[int] = ..., from_version: _Optional[int] = ..., issued_at: _Optional[float] = ..., expires_at: _Optional[float] = ...) -> None: ...

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

class ListFleetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFleetsResponse(_message.Message):
    __slots__ = ("fleets",)
    FLEETS_FIELD_NUMBER: _ClassVar[int]
    fleets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fleets: _Optional[_Iterable[str]] = ...) -> None: ...

class FleetStatusRequest(_message.Message):
    __slots__ = ("fleet",)
    FLEET_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    def __init__(self, fleet: _Optional[str] = ...) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "bundle_version", "requests", "rejects", "window_reject_rate", "spool_depth", "provider", "last_seen", "subscribed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REJECTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_REJECT_RATE_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    bundle_version: int
    requests: int
    rejects: int
    window_reject_rate: float
    spool_depth: int
    provider: str
    last_seen: float
    subscribed: bool
    def __init__(self, device_id: _Optional[str] = ..., bundle_version: _Optional[int] = ..., requests: _Optional[int] = ..., rejects: _Optional[int] = ..., window_reject_rate: _Optional[float] = ..., spool_depth: _Optional[int] = ..., provider: _Optional[str] = ..., last_seen: _Optional[float] = ..., subscribed: _Optional[bool] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("id", "from_version", "state", "reason", "detail", "version", "created_at", "updated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    from_version: int
    state: str
    reason: str
    detail: str
    version: int
    created_at: float
    updated_at: float
    def __init__(self, id: _Optional[str] = ..., from_version: _Optional[int] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., version: _Optional[int] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "quarantine_size", "current")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    quarantine_size: int
    current: bool
    def __init__(self, version: _Optional[int] = ..., quarantine_size: _Optional[int] = ..., current: _Optional[bool] = ...) -> None: ...

class FleetStatusResponse(_message.Message):
    __slots__ = ("fleet", "current_version", "versions", "devices", "jobs", "history", "rollout")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    current_version: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    history: _containers.RepeatedScalarFieldContainer[str]
    rollout: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fleet: _Optional[str] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ..., history: _Optional[_Iterable[str]] = ..., rollout: _Optional[_Iterable[str]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("fleet", "version", "note", "now")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    NOW_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    version: int
    note: str
    now: bool
    def __init__(self, fleet: _Optional[str] = ..., version: _Optional[int] = ..., note: _Optional[str] = ..., now: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("fleet", "version")
    FLEET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    fleet: str
    version: int
    def __init__(self, fleet: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...
