"""Domain errors as OpenAI's error envelope, with the matching HTTP status.

`{"error": {"message", "type", "param", "code"}}`; `Retry-After` when a wait helps.
The message is the domain error's, which never holds a secret or a stack trace.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from pydantic import ValidationError

from services.common.errors import InvalidArgument, TokenyardError

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def status_of(exc: TokenyardError) -> int:
    """The HTTP status of a domain error (500 for anything unmapped)."""
    return HTTP_STATUS.get(exc.code, 500)


def envelope(
    message: str, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = ERROR_TYPE.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_body(exc: TokenyardError, param: str | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, envelope) of a domain error; `param` is the OpenAI field name."""
    status = status_of(exc)
    message = exc.message
    if param and exc.field and message.startswith(f"{exc.field}:"):
        message = f"{param}:{message[len(exc.field) + 1 :]}"
    return status, envelope(message, status, param=param, code=exc.reason.lower())


def retry_headers(exc: TokenyardError) -> dict[str, str]:
    """`Retry-After` (whole seconds, at least 1) when the error says a wait helps."""
    if exc.retry_after is None:
        return {}
    return {"retry-after": str(max(1, math.ceil(exc.retry_after)))}


def from_validation(exc: ValidationError) -> InvalidArgument:
    """A pydantic error as an InvalidArgument naming the first bad field, OpenAI style."""
    first = exc.errors(include_url=False, include_input=False)[0]
    param = ""
    for part in first["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in {"str", "int", "float", "bool"} or "[" in str(part):
            continue  # the union member pydantic tried, not a field
        else:
            param += f".{part}" if param else str(part)
    if first["type"] == "json_invalid":
        return InvalidArgument("body", "is not valid JSON")
    if not param:
        return InvalidArgument("body", "must be a JSON object")
    return InvalidArgument(param, first["msg"])
