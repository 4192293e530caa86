"""The exception a tokenyard call raises: status, message and google.rpc details."""

from __future__ import annotations

import grpc

from services.common.status import ErrorDetails, details_of, grpc_code_name


class TokenyardCallError(Exception):
    """A call ended with a non-OK status; carries what the server's details said.

    `code` is the gRPC status, `reason` the `ErrorInfo` reason (`RATE_LIMITED`…),
    `metadata` its metadata (`field` for a bad request field), `retry_after` the
    `RetryInfo` delay in seconds when a wait would help.
    """

    def __init__(self, details: ErrorDetails) -> None:
        super().__init__(f"{grpc_code_name(details.code)}: {details.message}")
        self.details = details

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status code."""
        return self.details.code

    @property
    def status(self) -> str:
        """The status name as google.rpc.Code spells it (`UNAUTHENTICATED`)."""
        return grpc_code_name(self.details.code)

    @property
    def message(self) -> str:
        """The server's message (safe to show: it never holds a secret)."""
        return self.details.message

    @property
    def reason(self) -> str:
        """`ErrorInfo.reason`, empty when the server sent none."""
        return self.details.reason

    @property
    def metadata(self) -> dict[str, str]:
        """`ErrorInfo.metadata` (e.g. `field`)."""
        return self.details.metadata

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before retrying (`RetryInfo`), when the server said."""
        return self.details.retry_after


def from_rpc_error(exc: grpc.aio.AioRpcError) -> TokenyardCallError:
    """Turn a failed aio call into a TokenyardCallError with its parsed details."""
    return TokenyardCallError(details_of(exc))
