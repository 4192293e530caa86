"""`tokenyard health ADDR`: exit 0 when a server reports SERVING (compose, k8s probes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def credentials(
    tls_ca: Path | None, tls_cert: Path | None = None, tls_key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """TLS credentials for the probe (a client pair for mutual TLS), None for plaintext."""
    if tls_ca is None:
        return None
    cert = tls_cert.read_bytes() if tls_cert else None
    key = tls_key.read_bytes() if tls_key else None
    return grpc.ssl_channel_credentials(tls_ca.read_bytes(), key, cert)


async def check(
    target: str,
    service: str = "",
    timeout: float = 3.0,
    creds: grpc.ChannelCredentials | None = None,
) -> str:
    """The health status name of `service` at `target` (raises grpc.aio.AioRpcError)."""
    channel = (
        grpc.aio.insecure_channel(target)
        if creds is None
        else grpc.aio.secure_channel(target, creds)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def run(
    target: str,
    service: str = "",
    timeout: float = 3.0,
    creds: grpc.ChannelCredentials | None = None,
) -> int:
    """Print the status; 0 when SERVING, 1 otherwise or unreachable."""
    try:
        status = asyncio.run(check(target, service, timeout, creds))
    except grpc.aio.AioRpcError as exc:
        print(f"{target}: {exc.code().name}: {exc.details()}")
        return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1
