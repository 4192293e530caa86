"""Item 12.5: tokens per minute and quota hold against a burst of concurrent streams."""

from __future__ import annotations

import asyncio

import grpc
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from tests.doubles.fake_auth import principal
from tests.security import router_fixtures
from tests.security.router_fixtures import SecurityStack, bearer, drain, outcome
from tests.unit.router.conftest import MODEL

stack = router_fixtures.stack  # the fixture, on each limits backend

TPM = 300
MAX_TOKENS = 100
STREAMS = 12
PROMPT = "hello"  # 1 prompt token for the double, 5 bytes reserved at most


def stream(max_tokens: int = MAX_TOKENS) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt=PROMPT)
    request.sampling.max_tokens = max_tokens
    return request


async def burst(stack: SecurityStack, key: str) -> list[grpc.StatusCode]:
    app = await stack.limited_router()
    client = stack.client(app)
    calls = [drain(client.StreamGenerate(stream(), metadata=bearer(key))) for _ in range(STREAMS)]
    return list(await asyncio.gather(*(outcome(c) for c in calls)))


async def test_a_burst_of_streams_cannot_exceed_tokens_per_minute(stack: SecurityStack) -> None:
    """Attack: 12 concurrent 100-token streams under a 300 TPM role; with tokens counted
    only when streams end, all 12 were admitted (1,248 tokens in the minute). Tokens
    are reserved at admission, so the burst exceeds TPM by at most one request."""
    await stack.add_worker(token_delay=0.01)
    key = "ty_sk_tpmburst000000000000000000001"
    stack.auth.state.add_key(key, principal("cred-tpm", limits=res.Limits(tokens_per_minute=TPM)))
    codes = await burst(stack, key)
    admitted = codes.count(grpc.StatusCode.OK)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    per_request = 1 + MAX_TOKENS  # what each admitted stream used (double: 1 prompt token)
    assert admitted >= 1
    assert (admitted - 1) * per_request < TPM, f"{admitted} streams admitted under {TPM} TPM"


async def test_a_burst_of_streams_cannot_exceed_the_token_quota(stack: SecurityStack) -> None:
    """Attack: a caller with 300 tokens of daily quota left opens 12 concurrent 100-token
    streams; checked against settled tokens only, every one is admitted. Reserved at
    admission, the quota is exceeded by at most one request."""
    await stack.add_worker(token_delay=0.01)
    key = "ty_sk_quotaburst00000000000000000001"
    limits = res.Limits(token_quota=1000, quota_period=res.QUOTA_PERIOD_DAY)
    stack.auth.state.add_key(key, principal("cred-quota", limits=limits, quota_used=700))
    codes = await burst(stack, key)
    admitted = codes.count(grpc.StatusCode.OK)
    assert admitted >= 1
    assert (admitted - 1) * (1 + MAX_TOKENS) < 300, f"{admitted} streams admitted for 300 tokens"


async def test_a_failed_stream_gives_its_reservation_back(stack: SecurityStack) -> None:
    """Attack on availability: a reservation that is never refunded would lock a caller
    out for the minute after a failure. A refused request (the worker rejects it)
    returns its whole reservation, so a following request fits."""
    await stack.add_worker(context_length=64)
    key = "ty_sk_refund00000000000000000000001"
    stack.auth.state.add_key(
        key, principal("cred-refund", limits=res.Limits(tokens_per_minute=100))
    )
    app = await stack.limited_router()
    client = stack.client(app)
    # Over the double's context: the worker refuses it after admission (INVALID_ARGUMENT).
    code = await outcome(drain(client.StreamGenerate(stream(100), metadata=bearer(key))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for _ in range(2):
        await app.core.drain_background()
        assert await outcome(drain(client.StreamGenerate(stream(40), metadata=bearer(key)))) == (
            grpc.StatusCode.OK
        )
