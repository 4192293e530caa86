"""Client channels: keepalive that matches the servers, retries, default deadlines.

Internal callers (router → auth, router → worker) use `internal_channel`, which
adds the service token to every call and TLS when configured.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from services.common.config import InternalSettings
from services.common.interceptors import SERVICE_TOKEN_HEADER
from services.common.telemetry import client_tracing_interceptors

KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
DEFAULT_UNARY_TIMEOUT = 10.0


def retry_service_config(methods: Sequence[tuple[str, str]]) -> str:
    """A service config retrying the given idempotent (service, method) pairs on UNAVAILABLE."""
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": s, "method": m} for s, m in methods],
                    "retryPolicy": {
                        "maxAttempts": 4,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class _MetadataBase:
    """Adds fixed metadata and, for unary calls, a default deadline.

    grpc.aio files an interceptor under the first call kind it implements only,
    so unary and streaming calls each get their own subclass.
    """

    def __init__(self, extra: Sequence[tuple[str, str]], default_timeout: float | None) -> None:
        self.extra = tuple(extra)
        self.default_timeout = default_timeout

    def _details(self, details: Any, unary: bool) -> Any:
        metadata = list(details.metadata or ()) + list(self.extra)
        timeout = details.timeout
        if timeout is None and unary:
            timeout = self.default_timeout
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


class _Metadata(_MetadataBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Metadata and the default deadline for unary calls."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details, True), request)


class _StreamMetadata(_MetadataBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """The same metadata for server-streaming calls (no default deadline)."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(details, False), request)


def make_channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    metadata: Sequence[tuple[str, str]] = (),
    retry_methods: Sequence[tuple[str, str]] = (),
    default_timeout: float | None = DEFAULT_UNARY_TIMEOUT,
    max_message_bytes: int = 16 * 1024 * 1024,
    tracing: bool = True,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """An aio channel with keepalive, retries for `retry_methods` and default deadlines."""
    options: list[tuple[str, Any]] = [
        *KEEPALIVE_OPTIONS,
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        # Reconnect within ~2 s of the server's return: grpc's default backoff grows
        # to 120 s, so a router would refuse every uncached key long after auth is back.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if retry_methods:
        options.append(("grpc.service_config", retry_service_config(retry_methods)))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    interceptors: list[Any] = [
        _Metadata(metadata, default_timeout),
        _StreamMetadata(metadata, default_timeout),
    ]
    if tracing:
        interceptors = client_tracing_interceptors() + interceptors
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def internal_credentials(settings: InternalSettings) -> grpc.ChannelCredentials | None:
    """TLS (mutual when a client pair is set) for internal calls, or None for plaintext."""
    if settings.tls_ca is None:
        return None
    cert = settings.tls_cert.read_bytes() if settings.tls_cert else None
    key = settings.tls_key.read_bytes() if settings.tls_key else None
    return grpc.ssl_channel_credentials(settings.tls_ca.read_bytes(), key, cert)


def internal_channel(
    target: str,
    settings: InternalSettings,
    *,
    retry_methods: Sequence[tuple[str, str]] = (),
    default_timeout: float | None = DEFAULT_UNARY_TIMEOUT,
) -> grpc.aio.Channel:
    """A channel for internal calls: service token in metadata, TLS when configured."""
    metadata = [(SERVICE_TOKEN_HEADER, settings.service_token)] if settings.service_token else []
    return make_channel(
        target,
        credentials=internal_credentials(settings),
        metadata=metadata,
        retry_methods=retry_methods,
        default_timeout=default_timeout,
    )
