"""The gRPC server every service runs: health, reflection, limits, graceful stop.

A service builds a `GrpcServer`, adds its servicers, and calls `serve()`: the
server starts, health turns SERVING when the service says it is ready, and
SIGTERM/SIGINT turn health NOT_SERVING, refuse new calls and give running ones
the grace period to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common.config import InternalSettings, ServerSettings
from services.common.interceptors import (
    ClosingInnerStreams,
    ServerErrorInterceptor,
    ServiceTokenInterceptor,
    StreamClosingInterceptor,
)
from services.common.lenient import lenient
from services.common.peer_identity import PeerNameInterceptor
from services.common.telemetry import server_tracing_interceptor

log = logging.getLogger("tokenyard.server")


class _Health(HealthServicer):
    """grpcio's health servicer plus `List`, which it leaves unimplemented (INTERNAL)."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        reply = health_pb2.HealthListResponse()
        for service, status in self._server_status.items():
            reply.statuses[service].status = status
        return reply


# Clients ping every 30 s (see channels.KEEPALIVE_OPTIONS); allow that and a bit more.
SERVER_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
)


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files; mutual TLS with a client CA."""
    if settings.tls_cert is None and settings.tls_key is None:
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ValueError("TLS needs both a certificate and a key")
    pair = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    if settings.tls_client_ca is not None:
        return grpc.ssl_server_credentials(
            pair, root_certificates=settings.tls_client_ca.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


class GrpcServer:
    """A grpc.aio server with the shared interceptor stack, health and reflection."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        service_token: str | None = None,
        token_methods: Sequence[str] | None = None,
        quiet_methods: Sequence[str] = (),
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Mapping[str, int] | None = None,
        maximum_concurrent_rpcs: int | None = None,
    ) -> None:
        self.settings = settings
        interceptors: list[grpc.aio.ServerInterceptor] = [
            StreamClosingInterceptor(),  # first: outermost, see its docstring
            ClosingInnerStreams(server_tracing_interceptor()),
            ServerErrorInterceptor(quiet_methods),
        ]
        if service_token:
            interceptors.append(ServiceTokenInterceptor(service_token, token_methods))
        if settings.tls_client_ca is not None and settings.tls_client_names:
            interceptors.append(PeerNameInterceptor(settings.tls_client_names, token_methods))
        interceptors.extend(extra_interceptors)
        limit = settings.max_message_bytes
        merged: dict[str, Any] = {
            "grpc.max_send_message_length": limit,
            "grpc.max_receive_message_length": limit,
            "grpc.max_metadata_size": 16 * 1024,
            "grpc.so_reuseport": 0,
            **dict(SERVER_KEEPALIVE_OPTIONS),
            **(options or {}),  # a service's own (the router's request bounds)
        }
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=list(merged.items()),
            maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        )
        self.health = _Health()
        lenient(health_pb2_grpc.add_HealthServicer_to_server)(self.health, self.server)
        self._service_names: list[str] = [reflection.SERVICE_NAME, "grpc.health.v1.Health"]
        self.port = 0
        self._stopping = asyncio.Event()

    def add(
        self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, name: str
    ) -> None:
        """Add a servicer (`add_XServicer_to_server`, instance, full service name)."""
        register(servicer, self.server)
        self._service_names.append(name)

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until `set_serving`); returns the port."""
        if self.settings.reflection:
            reflection.enable_server_reflection(self._service_names, self.server)
        address = f"{self.settings.host}:{self.settings.port}"
        creds = server_credentials(self.settings)
        if creds is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, creds)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self.set_serving(False)
        await self.server.start()
        log.info("listening", extra={"address": f"{self.settings.host}:{self.port}"})
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the server and each of its services."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names[2:]]:
            await self.health.set(name, status)

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stopping.set()

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let running ones finish within grace."""
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_period if grace is None else grace
        log.info("stopping", extra={"grace_period_s": grace})
        await self.server.stop(grace)

    async def wait_for_stop_signal(self) -> None:
        """Return on SIGTERM, SIGINT or `request_stop()`."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stopping.set)
                installed.append(sig)
        try:
            await self._stopping.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


def internal_token_methods(*names: str) -> list[str]:
    """Full method names (`/pkg.Service/Method`) for ServiceTokenInterceptor."""
    return [n if n.startswith("/") else "/" + n for n in names]


__all__ = ["GrpcServer", "InternalSettings", "internal_token_methods", "server_credentials"]
