"""Item 12.17: what an unauthenticated caller can make the router buffer and hold."""

from __future__ import annotations

import grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.router.settings import RouterServerSettings
from tests.unit.router.conftest import MODEL, Stack, bearer


def server(
    *,
    max_request_bytes: int = 4 * 1024 * 1024,
    max_streams_per_connection: int = 100,
    max_concurrent_rpcs: int = 4096,
) -> RouterServerSettings:
    return RouterServerSettings(
        port=0,
        grace_period=1.0,
        reflection=False,
        max_request_bytes=max_request_bytes,
        max_streams_per_connection=max_streams_per_connection,
        max_concurrent_rpcs=max_concurrent_rpcs,
    )


def stream(prompt: str = "hello", max_tokens: int = 1000) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt=prompt)
    request.sampling.max_tokens = max_tokens
    return request


async def test_a_request_over_the_size_bound_is_refused_before_authentication() -> None:
    """Attack: with a 16 MiB message limit, anyone (no key needed) could make the router
    buffer 16 MiB per call before it authenticated them. Requests are bounded by
    max_request_bytes, checked before auth is ever asked."""
    stack = Stack()
    await stack.start_auth()
    try:
        await stack.add_worker()
        app = await stack.router(server=server(max_request_bytes=64 * 1024))
        client = stack.client(app)
        calls_before = stack.auth.state.authenticate_calls
        big = stream(prompt="x" * (256 * 1024))
        try:
            await client.Generate(
                gen.GenerateRequest.FromString(big.SerializeToString()),
                metadata=bearer("ty_sk_nobody0000000000000000000001"),
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            raise AssertionError("a request over the bound was accepted")
        assert stack.auth.state.authenticate_calls == calls_before
        small = gen.GenerateRequest(model=MODEL, prompt="hello")
        small.sampling.max_tokens = 2
        assert (await client.Generate(small, metadata=bearer())).usage.completion_tokens == 2
    finally:
        await stack.close()


async def test_concurrent_rpcs_on_one_connection_are_capped() -> None:
    """Attack: one client opened thousands of streams on one connection, each holding
    router memory and a task. The router caps RPCs per connection (HTTP/2
    max_concurrent_streams): the next one waits, while other connections are served."""
    stack = Stack()
    await stack.start_auth()
    try:
        worker = await stack.add_worker(token_delay=0.05)
        app = await stack.router(server=server(max_streams_per_connection=2))
        first = stack.client(app)
        held = [first.StreamGenerate(stream(), metadata=bearer()) for _ in range(2)]
        for call in held:
            await call.read()
        waiting = first.StreamGenerate(stream(max_tokens=1), metadata=bearer(), timeout=1.0)
        try:
            await waiting.read()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            raise AssertionError("a third stream ran on a connection capped at two")
        assert worker.load.running == 2
        # Another connection (its own subchannel: channels to one address share one
        # by default) is served meanwhile.
        other = grpc.aio.insecure_channel(
            app.address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        stack.channels.append(other)
        small = gen.GenerateRequest(model=MODEL, prompt="hello")
        small.sampling.max_tokens = 1
        reply = await gen_grpc.GenerationServiceStub(other).Generate(small, metadata=bearer())
        assert reply.usage.completion_tokens == 1
        for call in held:
            call.cancel()
    finally:
        await stack.close()


async def test_concurrent_rpcs_are_capped_in_total() -> None:
    """Attack: many connections, each within its own cap, together held unbounded
    router memory. Past max_concurrent_rpcs a new call gets RESOURCE_EXHAUSTED."""
    stack = Stack()
    await stack.start_auth()
    try:
        await stack.add_worker(token_delay=0.05)
        app = await stack.router(server=server(max_concurrent_rpcs=2))
        channels = [grpc.aio.insecure_channel(app.address) for _ in range(3)]
        stack.channels.extend(channels)
        stubs = [gen_grpc.GenerationServiceStub(c) for c in channels]
        held = [stub.StreamGenerate(stream(), metadata=bearer()) for stub in stubs[:2]]
        for call in held:
            await call.read()
        try:
            await stubs[2].StreamGenerate(stream(max_tokens=1), metadata=bearer()).read()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            raise AssertionError("a third concurrent RPC was accepted")
        for call in held:
            call.cancel()
    finally:
        await stack.close()
