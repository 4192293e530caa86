"""Domain error → gRPC status with `google.rpc.Status` details, and back.

Servers send `ErrorInfo` (reason, domain, metadata with the field), `RetryInfo`
where a wait helps and `QuotaFailure` for limits, in the standard
`grpc-status-details-bin` trailer that every gRPC language reads (packed and
read by grpcio-status).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import ResourceExhausted, TokenyardError

DOMAIN = "tokenyard.dev"


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


def to_grpc_status(err: TokenyardError) -> grpc.Status:
    """The status (code, message, details trailer) a servicer aborts with."""
    return rpc_status.to_status(to_status_proto(err))  # type: ignore[no-any-return]


@dataclass
class ErrorDetails:
    """What a client learns from a failed call's details."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    quota_violations: list[tuple[str, str]] = field(default_factory=list)


def details_of(err: grpc.RpcError) -> ErrorDetails:
    """What a failed call's `google.rpc.Status` details say (empty when it has none).

    Details whose code or message disagree with the call's own status (a proxy
    rewrote it) are ignored rather than trusted.
    """
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    out = ErrorDetails(code=code, message=err.details() or "")  # type: ignore[attr-defined]
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        return out
    for detail in status.details if status is not None else ():
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
