import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExecutionPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_PATH_UNSPECIFIED: _ClassVar[ExecutionPath]
    EXECUTION_PATH_FAST: _ClassVar[ExecutionPath]
    EXECUTION_PATH_GENERIC: _ClassVar[ExecutionPath]
EXECUTION_PATH_UNSPECIFIED: ExecutionPath
EXECUTION_PATH_FAST: ExecutionPath
EXECUTION_PATH_GENERIC: ExecutionPath

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("worker_id", "model", "context_length", "vocab_size", "max_running", "max_queued", "device", "dtype", "version", "prefix_cache", "execution_path", "model_revision", "quantization")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model: str
    context_length: int
    vocab_size: int
    max_running: int
    max_queued: int
    device: str
    dtype: str
    version: str
    prefix_cache: bool
    execution_path: ExecutionPath
    model_revision: str
    quantization: str
    def __init__(self, worker_id: _Optional[str] = ..., model: _Optional[str] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_running: _Optional[int] = ..., max_queued: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., version: _Optional[str] = ..., prefix_cache: _Optional[bool] = ..., execution_path: _Optional[_Union[ExecutionPath, str]] = ..., model_revision: _Optional[str] = ..., quantization: _Optional[str] = ...) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class WatchLoadResponse(_message.Message):
    __slots__ = ("running", "queued", "free_slots", "pending_tokens", "tokens_per_second", "prefix_cache_hits", "prefix_cache_queries", "prefix_cache_reused_tokens", "draining", "report_time", "kv_cache_usage", "queue_time_p50_seconds", "queue_time_p95_seconds")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    REPORT_TIME_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_P95_SECONDS_FIELD_NUMBER: _ClassVar[int]
    running: int
    queued: int
    free_slots: int
    pending_tokens: int
    tokens_per_second: float
    prefix_cache_hits: int
    prefix_cache_queries: int
    prefix_cache_reused_tokens: int
    draining: bool
    report_time: _timestamp_pb2.Timestamp
    kv_cache_usage: float
    queue_time_p50_seconds: float
    queue_time_p95_seconds: float
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., free_slots: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., prefix_cache_hits: _Optional[int] = ..., prefix_cache_queries: _Optional[int] = ..., prefix_cache_reused_tokens: _Optional[int] = ..., draining: _Optional[bool] = ..., report_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kv_cache_usage: _Optional[float] = ..., queue_time_p50_seconds: _Optional[float] = ..., queue_time_p95_seconds: _Optional[float] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("remaining",)
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    remaining: int
    def __init__(self, remaining: _Optional[int] = ...) -> None: ...
