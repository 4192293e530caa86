"""`tokenyard health ADDR`: exit 0 when a server reports SERVING (compose, k8s probes)."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The health status name of `service` at `target` (raises grpc.aio.AioRpcError)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def run(target: str, service: str = "", timeout: float = 3.0) -> int:
    """Print the status; 0 when SERVING, 1 otherwise or unreachable."""
    try:
        status = asyncio.run(check(target, service, timeout))
    except grpc.aio.AioRpcError as exc:
        print(f"{target}: {exc.code().name}: {exc.details()}")
        return 1
    print(f"{target}: {status}")
    return 0 if status == "SERVING" else 1
