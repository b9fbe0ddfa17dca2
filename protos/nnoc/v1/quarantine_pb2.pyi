import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QuarantineHeader(_message.Message):
    __slots__ = ("device_id", "fleet", "bundle_version", "seq", "shape", "dtype", "primary_label", "monitor_label", "captured_at", "source_id", "position", "reject_score", "batched_acks")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_LABEL_FIELD_NUMBER: _ClassVar[int]
    MONITOR_LABEL_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    REJECT_SCORE_FIELD_NUMBER: _ClassVar[int]
    BATCHED_ACKS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    fleet: str
    bundle_version: int
    seq: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    primary_label: int
    monitor_label: int
    captured_at: _timestamp_pb2.Timestamp
    source_id: str
    position: int
    reject_score: float
    batched_acks: bool
    def __init__(self, device_id: _Optional[str] = ..., fleet: _Optional[str] = ..., bundle_version: _Optional[int] = ..., seq: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., primary_label: _Optional[int] = ..., monitor_label: _Optional[int] = ..., captured_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_id: _Optional[str] = ..., position: _Optional[int] = ..., reject_score: _Optional[float] = ..., batched_acks: _Optional[bool] = ...) -> None: ...

class QuarantineReply(_message.Message):
    __slots__ = ("device_id", "seq", "status", "error", "retry_after", "acked")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[QuarantineReply.Status]
        ACK: _ClassVar[QuarantineReply.Status]
        REJECTED: _ClassVar[QuarantineReply.Status]
        THROTTLED: _ClassVar[QuarantineReply.Status]
        OVER_QUOTA: _ClassVar[QuarantineReply.Status]
        UNAVAILABLE: _ClassVar[QuarantineReply.Status]
    STATUS_UNSPECIFIED: QuarantineReply.Status
    ACK: QuarantineReply.Status
    REJECTED: QuarantineReply.Status
    THROTTLED: QuarantineReply.Status
    OVER_QUOTA: QuarantineReply.Status
    UNAVAILABLE: QuarantineReply.Status
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    seq: int
    status: QuarantineReply.Status
    error: str
    retry_after: float
    acked: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, device_id: _Optional[str] = ..., seq: _Optional[int] = ..., status: _Optional[_Union[QuarantineReply.Status, str]] = ..., error: _Optional[str] = ..., retry_after: _Optional[float] = ..., acked: _Optional[_Iterable[int]] = ...) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("device_id", "fleet", "bundle_version", "requests", "rejects", "window_reject_rate", "window_size", "spool_depth", "spool_dropped", "provider", "sent_at", "version_requests", "version_rejects", "version_errors")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REJECTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_REJECT_RATE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DEPTH_FIELD_NUMBER: _ClassVar[int]
    SPOOL_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_REJECTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_ERRORS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    fleet: str
    bundle_version: int
    requests: int
    rejects: int
    window_reject_rate: float
    window_size: int
    spool_depth: int
    spool_dropped: int
    provider: str
    sent_at: _timestamp_pb2.Timestamp
    version_requests: int
    version_rejects: int
    version_errors: int
    def __init__(self, device_id: _Optional[str] = ..., fleet: _Optional[str] = ..., bundle_version: _Optional[int] = ..., requests: _Optional[int] = ..., rejects: _Optional[int] = ..., window_reject_rate: _Optional[float] = ..., window_size: _Optional[int] = ..., spool_depth: _Optional[int] = ..., spool_dropped: _Optional[int] = ..., provider: _Optional[str] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., version_requests: _Optional[int] = ..., version_rejects: _Optional[int] = ..., version_errors: _Optional[int] = ...) -> None: ...
