"""The shared server core: health, reflection, error mapping, graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.common import errors
from services.common.config import ServerSettings
from services.common.interceptors import SERVICE_TOKEN_HEADER
from services.common.lenient import lenient
from services.common.server import GrpcServer
from services.common.status import details_of
from tests.conftest import eventually

SERVICE = "tokenyard.generation.v1.GenerationService"

ERRORS: dict[str, errors.TokenyardError] = {
    "bad": errors.InvalidArgument("sampling.top_p", "must be in (0, 1]"),
    "missing": errors.NotFound("model 'missing' is not served", reason="MODEL_NOT_FOUND"),
    "nokey": errors.Unauthenticated(),
    "denied": errors.PermissionDenied("model not allowed", reason="MODEL_NOT_ALLOWED"),
    "limited": errors.ResourceExhausted(
        "rate limit", reason="RATE_LIMITED", retry_after=1.5, quota_subject="key:k1"
    ),
    "down": errors.Unavailable("no worker", retry_after=0.5),
}


class Servicer(gen_grpc.GenerationServiceServicer):
    """Raises a domain error chosen by the model name; streams slowly."""

    def __init__(self) -> None:
        self.streaming = asyncio.Event()

    async def Generate(self, request: gen.GenerateRequest, context: Any) -> gen.GenerateResponse:
        if request.model in ERRORS:
            raise ERRORS[request.model]
        if request.model == "crash":
            raise RuntimeError("SELECT secret FROM keys -- must not reach the client")
        return gen.GenerateResponse(model=request.model, text="ok")

    async def StreamGenerate(
        self, request: gen.StreamGenerateRequest, context: Any
    ) -> AsyncIterator[gen.StreamGenerateResponse]:
        for i in range(5):
            self.streaming.set()
            yield gen.StreamGenerateResponse(text=str(i))
            await asyncio.sleep(0.1)


async def start(token: str | None = None) -> tuple[GrpcServer, Servicer, grpc.aio.Channel]:
    server = GrpcServer(ServerSettings(grace_period=5.0), service_token=token)
    servicer = Servicer()
    server.add(gen_grpc.add_GenerationServiceServicer_to_server, servicer, SERVICE)
    port = await server.start()
    await server.set_serving(True)
    return server, servicer, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def test_health_reports_serving_and_not_serving() -> None:
    server, _, channel = await start()
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    await server.set_serving(False)
    second = await watch.read()
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    await channel.close()
    await server.stop(0)


async def test_reflection_lists_services() -> None:
    server, _, channel = await start()
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: list[str] = []
    async for reply in stub.ServerReflectionInfo(requests()):
        names = [s.name for s in reply.list_services_response.service]
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names
    await channel.close()
    await server.stop(0)


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("missing", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ("nokey", grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        ("denied", grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED"),
        ("limited", grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
        ("down", grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
    ],
)
async def test_domain_errors_map_to_status_with_details(
    model: str, code: grpc.StatusCode, reason: str
) -> None:
    server, _, channel = await start()
    stub = gen_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(gen.GenerateRequest(model=model))
    err = caught.value
    details = details_of(err)
    assert details.code == code
    assert details.reason == reason
    if model == "bad":
        assert details.metadata["field"] == "sampling.top_p"
        assert "sampling.top_p" in details.message
    if model == "limited":
        assert details.retry_after == pytest.approx(1.5)
        assert details.quota_violations == [("key:k1", "rate limit")]
    await channel.close()
    await server.stop(0)


async def _trailers(err: grpc.aio.AioRpcError) -> Any:
    return tuple(err.trailing_metadata() or ())


async def test_unexpected_error_is_internal_without_leaking() -> None:
    server, _, channel = await start()
    stub = gen_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(gen.GenerateRequest(model="crash"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "SELECT" not in (caught.value.details() or "")
    assert "Traceback" not in (caught.value.details() or "")
    # The server keeps serving after the error.
    reply = await stub.Generate(gen.GenerateRequest(model="fine"))
    assert reply.text == "ok"
    await channel.close()
    await server.stop(0)


async def _refused_soon(stub: gen_grpc.GenerationServiceStub) -> Any:
    """The status new calls get once the stopping server refuses them.

    A call that races the start of the stop may still be served, or cancelled by
    grpc as the server shuts down (CANCELLED): both mean "not yet refused".
    """
    codes: list[grpc.StatusCode] = []

    async def refused() -> bool:
        try:
            await stub.Generate(gen.GenerateRequest(model="new"), timeout=5)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                codes.append(err.code())
        return bool(codes)

    await eventually(refused, what="the stopping server refusing new calls")
    return codes[0]


async def test_graceful_stop_finishes_stream_and_refuses_new_calls() -> None:
    server, servicer, channel = await start()
    stub = gen_grpc.GenerationServiceStub(channel)
    call = stub.StreamGenerate(gen.StreamGenerateRequest(model="m"))
    received = [(await call.read()).text]
    await servicer.streaming.wait()
    stopping = asyncio.create_task(server.stop(5.0))
    assert await _refused_soon(stub) == grpc.StatusCode.UNAVAILABLE
    while (msg := await call.read()) is not grpc.aio.EOF:
        received.append(msg.text)
    assert received == ["0", "1", "2", "3", "4"]
    assert await call.code() == grpc.StatusCode.OK
    await stopping
    await channel.close()


async def test_service_token_required_when_configured() -> None:
    server, _, channel = await start(token="s3cret-token")
    stub = gen_grpc.GenerationServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(gen.GenerateRequest(model="fine"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(
            gen.GenerateRequest(model="fine"), metadata=((SERVICE_TOKEN_HEADER, "wrong"),)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stream = stub.StreamGenerate(gen.StreamGenerateRequest(model="m"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = await stub.Generate(
        gen.GenerateRequest(model="fine"), metadata=((SERVICE_TOKEN_HEADER, "s3cret-token"),)
    )
    assert reply.text == "ok"
    # Health stays open to probes without the token.
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1
    await channel.close()
    await server.stop(0)


async def test_quiet_methods_log_successes_at_debug_and_failures_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """High-rate internal RPCs do not flood the access log, but their errors still show."""
    caplog.set_level(logging.DEBUG, logger="tokenyard.access")
    server = GrpcServer(
        ServerSettings(), quiet_methods=[f"/{SERVICE}/Generate", f"/{SERVICE}/Nothing"]
    )
    server.add(gen_grpc.add_GenerationServiceServicer_to_server, Servicer(), SERVICE)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = gen_grpc.GenerationServiceStub(channel)
    await stub.Generate(gen.GenerateRequest(model="fine"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Generate(gen.GenerateRequest(model="bad"))
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tokenyard.access"]
    assert (logging.DEBUG, f"/{SERVICE}/Generate OK") in levels
    assert (logging.INFO, f"/{SERVICE}/Generate INVALID_ARGUMENT") in levels
    await channel.close()
    await server.stop(0)


class Flooder(gen_grpc.GenerationServiceServicer):
    """Streams large messages until closed; records the task it started and ended in."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.closed = asyncio.Event()
        self.sent = 0

    async def StreamGenerate(
        self, request: gen.StreamGenerateRequest, context: Any
    ) -> AsyncIterator[gen.StreamGenerateResponse]:
        self.tasks.append(asyncio.current_task())
        try:
            while True:
                yield gen.StreamGenerateResponse(text="x" * 256_000)
                self.sent += 1
        finally:
            self.tasks.append(asyncio.current_task())
            self.closed.set()


async def _blocked_in_a_send(flooder: Flooder) -> None:
    """Wait until the server has filled the flow-control window: its sends stop advancing."""
    seen = [-1]

    def stalled() -> bool:
        still = flooder.sent == seen[0] and flooder.sent >= 2
        seen[0] = flooder.sent
        return still

    await eventually(stalled, interval=0.1, what="the server blocking in a send")


async def test_a_stream_cancelled_inside_a_send_is_closed_in_its_own_task() -> None:
    # The client reads once and stops: the server blocks sending (flow control) when
    # the cancel lands. Every layer (lenient decoding, error mapping, stream closing)
    # must close the generator it iterates, in the call's task: with garbage
    # collection off, an abandoned one would be finalised by asyncio in a new task.
    server = GrpcServer(ServerSettings(grace_period=1.0))
    flooder = Flooder()
    server.add(lenient(gen_grpc.add_GenerationServiceServicer_to_server), flooder, SERVICE)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    gc.disable()
    try:
        call = gen_grpc.GenerationServiceStub(channel).StreamGenerate(gen.StreamGenerateRequest())
        await call.read()
        await _blocked_in_a_send(flooder)
        call.cancel()
        await asyncio.wait_for(flooder.closed.wait(), 5)
    finally:
        gc.enable()
    assert len(flooder.tasks) == 2
    assert flooder.tasks[0] is flooder.tasks[1]
    await channel.close()
    await server.stop(0)
