import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputSpec(_message.Message):
    __slots__ = ("shape", "dtype", "layout", "scale", "min_value", "max_value", "input_name", "output_name", "preprocess")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUE_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUE_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    layout: str
    scale: float
    min_value: float
    max_value: float
    input_name: str
    output_name: str
    preprocess: Preprocess
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., layout: _Optional[str] = ..., scale: _Optional[float] = ..., min_value: _Optional[float] = ..., max_value: _Optional[float] = ..., input_name: _Optional[str] = ..., output_name: _Optional[str] = ..., preprocess: _Optional[_Union[Preprocess, _Mapping]] = ...) -> None: ...

class Preprocess(_message.Message):
    __slots__ = ("color", "size", "resize", "interpolation", "scale", "mean", "std", "layout")
    COLOR_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    INTERPOLATION_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    color: str
    size: _containers.RepeatedScalarFieldContainer[int]
    resize: str
    interpolation: str
    scale: float
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    layout: str
    def __init__(self, color: _Optional[str] = ..., size: _Optional[_Iterable[int]] = ..., resize: _Optional[str] = ..., interpolation: _Optional[str] = ..., scale: _Optional[float] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., layout: _Optional[str] = ...) -> None: ...

class Metrics(_message.Message):
    __slots__ = ("eval_clean_accuracy", "test_clean_accuracy", "attack_success_rate", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EVAL_CLEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_CLEAN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ATTACK_SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    eval_clean_accuracy: float
    test_clean_accuracy: float
    attack_success_rate: float
    extra: _containers.ScalarMap[str, float]
    def __init__(self, eval_clean_accuracy: _Optional[float] = ..., test_clean_accuracy: _Optional[float] = ..., attack_success_rate: _Optional[float] = ..., extra: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "role", "sha256", "size", "metrics")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    sha256: str
    size: int
    metrics: Metrics
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("algorithm", "key_id", "value", "envelope", "payload_type", "signed_body")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_BODY_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    key_id: str
    value: bytes
    envelope: str
    payload_type: str
    signed_body: bytes
    def __init__(self, algorithm: _Optional[str] = ..., key_id: _Optional[str] = ..., value: _Optional[bytes] = ..., envelope: _Optional[str] = ..., payload_type: _Optional[str] = ..., signed_body: _Optional[bytes] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("format", "fleet", "version", "parent_version", "artifacts", "input_spec", "class_names", "created_at", "created_by", "provenance", "signature", "reject_rule")
    class ProvenanceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SPEC_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    REJECT_RULE_FIELD_NUMBER: _ClassVar[int]
    format: int
    fleet: str
    version: int
    parent_version: int
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    input_spec: InputSpec
    class_names: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    created_by: str
    provenance: _containers.ScalarMap[str, str]
    signature: Signature
    reject_rule: RejectRule
    def __init__(self, format: _Optional[int] = ..., fleet: _Optional[str] = ..., version: _Optional[int] = ..., parent_version: _Optional[int] = ..., artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ..., input_spec: _Optional[_Union[InputSpec, _Mapping]] = ..., class_names: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., provenance: _Optional[_Mapping[str, str]] = ..., signature: _Optional[_Union[Signature, _Mapping]] = ..., reject_rule: _Optional[_Union[RejectRule, _Mapping]] = ...) -> None: ...

class RejectRule(_message.Message):
    __slots__ = ("score", "threshold", "clean_reject_budget", "eval_clean_reject_rate", "calibration_set", "calibration_inputs", "calibration_confidence", "score_scales")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLEAN_REJECT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    EVAL_CLEAN_REJECT_RATE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_SET_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_INPUTS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_SCALES_FIELD_NUMBER: _ClassVar[int]
    score: str
    threshold: float
    clean_reject_budget: float
    eval_clean_reject_rate: float
    calibration_set: str
    calibration_inputs: int
    calibration_confidence: float
    score_scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, score: _Optional[str] = ..., threshold: _Optional[float] = ..., clean_reject_budget: _Optional[float] = ..., eval_clean_reject_rate: _Optional[float] = ..., calibration_set: _Optional[str] = ..., calibration_inputs: _Optional[int] = ..., calibration_confidence: _Optional[float] = ..., score_scales: _Optional[_Iterable[float]] = ...) -> None: ...
