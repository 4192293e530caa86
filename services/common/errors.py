"""Domain errors: what went wrong, in the service's own terms.

Services raise these; only the error interceptor (`services.common.interceptors`)
turns them into gRPC statuses with `google.rpc.Status` details. A message here is
shown to the caller, so it must never hold a secret, SQL or a stack trace.
"""

from __future__ import annotations

import grpc


class TokenyardError(Exception):
    """Base of every error a caller may see.

    `reason` is a stable UPPER_SNAKE identifier sent as `google.rpc.ErrorInfo.reason`;
    `field` names the offending request field, when there is one; `retry_after`
    (seconds) becomes `google.rpc.RetryInfo` when a wait would help.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})


class InvalidArgument(TokenyardError):
    """A request field is malformed or out of range; `field` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}: {message}", reason=reason, field=field)


class NotFound(TokenyardError):
    """The named object (model, user, role, key) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(TokenyardError):
    """An object with that unique name exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(TokenyardError):
    """The system is not in the state the call needs (role in use, admin exists)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Unauthenticated(TokenyardError):
    """Missing, malformed, unknown, expired or revoked credential.

    One message for every cause, so a caller cannot tell which keys exist.
    """

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"

    def __init__(self, message: str = "invalid or missing credential", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]


class PermissionDenied(TokenyardError):
    """The credential is valid but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(TokenyardError):
    """A rate limit, quota or capacity is used up.

    `quota_subject` and `quota_description` become `google.rpc.QuotaFailure`.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after: float | None = None,
        quota_subject: str | None = None,
        quota_description: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason, retry_after=retry_after)
        self.quota_subject = quota_subject
        self.quota_description = quota_description


class Unavailable(TokenyardError):
    """A dependency (auth, every worker) cannot be reached; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(TokenyardError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(TokenyardError):
    """The work was cancelled (by the client or a drain)."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"
