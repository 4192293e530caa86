"""Domain error → gRPC status with `google.rpc.Status` details, and back.

Servers send `ErrorInfo` (reason, domain, metadata with the field), `RetryInfo`
where a wait helps and `QuotaFailure` for limits, in the standard
`grpc-status-details-bin` trailer that every gRPC language reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common.errors import ResourceExhausted, TokenyardError

DOMAIN = "tokenyard.dev"
DETAILS_KEY = "grpc-status-details-bin"


def to_status_proto(err: TokenyardError) -> status_pb2.Status:
    """The `google.rpc.Status` a domain error is sent as."""
    code: int = err.code.value[0]
    status = status_pb2.Status(code=code, message=err.message)
    meta = dict(err.metadata)
    if err.field:
        meta["field"] = err.field
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=meta)
    _pack(status, info)
    if err.retry_after is not None and math.isfinite(err.retry_after):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(err.retry_after, 0.0) * 1e9))
        _pack(status, error_details_pb2.RetryInfo(retry_delay=delay))
    if isinstance(err, ResourceExhausted) and err.quota_subject:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=err.quota_subject, description=err.quota_description or err.message
        )
        _pack(status, error_details_pb2.QuotaFailure(violations=[violation]))
    return status


def _pack(status: status_pb2.Status, detail: object) -> None:
    packed = any_pb2.Any()
    packed.Pack(detail)  # type: ignore[arg-type]
    status.details.append(packed)


def trailers_for(err: TokenyardError) -> tuple[tuple[str, bytes | str], ...]:
    """Trailing metadata carrying the details of `err`."""
    return ((DETAILS_KEY, to_status_proto(err).SerializeToString()),)


@dataclass
class ErrorDetails:
    """What a client learns from a failed call's details."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    quota_violations: list[tuple[str, str]] = field(default_factory=list)


def parse_details(
    code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str | bytes], ...] | None
) -> ErrorDetails:
    """Read `google.rpc.Status` details from a call's trailing metadata."""
    out = ErrorDetails(code=code, message=message)
    for key, value in trailing or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                out.reason, out.metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                out.retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                out.quota_violations = [(v.subject, v.description) for v in quota.violations]
    return out


def grpc_code_name(code: grpc.StatusCode) -> str:
    """`OK`, `INVALID_ARGUMENT`… as the google.rpc.Code enum spells it."""
    return str(code_pb2.Code.Name(code.value[0]))
