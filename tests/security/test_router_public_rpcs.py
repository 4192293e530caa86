"""Items 12.7 and 12.8: every public RPC is limited and checked; repeated fields are bounded."""

from __future__ import annotations

import grpc
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.requests import MAX_STOP_TOKEN_IDS
from services.common.status import details_of
from tests.doubles.fake_auth import principal
from tests.security import router_fixtures
from tests.security.router_fixtures import SecurityStack, bearer, drain, outcome
from tests.unit.router.conftest import MODEL

stack = router_fixtures.stack  # the fixture, on each limits backend

KEY = "ty_sk_publicrpcs000000000000000001"


def stream(**fields: object) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt="hello", **fields)  # type: ignore[arg-type]
    request.sampling.max_tokens = 4
    return request


async def refusal(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc
    pytest.fail("the call was accepted")


async def test_count_tokens_and_list_models_count_against_requests_per_minute(
    stack: SecurityStack,
) -> None:
    """Attack: CountTokens ignored the request rate, so a key limited to 3 requests a
    minute could make the workers tokenize without bound. Every public RPC counts."""
    await stack.add_worker()
    stack.auth.state.add_key(KEY, principal("cred-rpm", limits=res.Limits(requests_per_minute=3)))
    client = stack.client(await stack.limited_router())
    md = bearer(KEY)
    count = gen.CountTokensRequest(model=MODEL, prompt="hello")
    assert await outcome(client.CountTokens(count, metadata=md)) == grpc.StatusCode.OK
    assert await outcome(client.ListModels(gen.ListModelsRequest(), metadata=md)) == (
        grpc.StatusCode.OK
    )
    assert await outcome(drain(client.StreamGenerate(stream(), metadata=md))) == grpc.StatusCode.OK
    for call in (
        client.CountTokens(count, metadata=md),
        client.ListModels(gen.ListModelsRequest(), metadata=md),
        client.Generate(gen.GenerateRequest(model=MODEL, prompt="hello"), metadata=md),
    ):
        exc = await refusal(call)
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests per minute" in (exc.details() or "")


async def test_count_tokens_is_refused_once_the_quota_is_used_up(stack: SecurityStack) -> None:
    """Attack: CountTokens ignored the quota, so a caller without quota kept the workers'
    tokenizers busy. It is refused like a generation."""
    await stack.add_worker()
    limits = res.Limits(token_quota=100, quota_period=res.QUOTA_PERIOD_DAY)
    stack.auth.state.add_key(KEY, principal("cred-quota", limits=limits, quota_used=100))
    client = stack.client(await stack.limited_router())
    count = gen.CountTokensRequest(model=MODEL, prompt="hello")
    exc = await refusal(client.CountTokens(count, metadata=bearer(KEY)))
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_count_tokens_needs_the_generate_permission_and_the_model(
    stack: SecurityStack,
) -> None:
    """CountTokens makes the same permission checks as generation."""
    await stack.add_worker()
    stack.auth.state.add_key(KEY, principal("cred-list", permissions=("models.list",)))
    other = "ty_sk_othermodel00000000000000001"
    stack.auth.state.add_key(other, principal("cred-other", models=("other-*",)))
    client = stack.client(await stack.limited_router())
    count = gen.CountTokensRequest(model=MODEL, prompt="hello")
    for key in (KEY, other):
        exc = await refusal(client.CountTokens(count, metadata=bearer(key)))
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("field", "build"),
    [
        (
            "sampling.stop_token_ids",
            lambda r: r.sampling.stop_token_ids.extend(range(MAX_STOP_TOKEN_IDS + 1)),
        ),
        ("token_ids", lambda r: r.token_ids.ids.extend([7] * 5000)),
        (
            "messages",
            lambda r: r.messages.messages.extend(
                gen.ChatMessage(role="user", content="x") for _ in range(5000)
            ),
        ),
    ],
)
async def test_repeated_fields_are_bounded_at_the_router(
    stack: SecurityStack, field: str, build: object
) -> None:
    """Attack: 100,000 stop_token_ids (or ids, or chat turns) in one request reached the
    worker, whose event loop walked them for every token. The router refuses them,
    naming the field, before any worker sees them."""
    worker = await stack.add_worker(context_length=4096)
    stack.auth.state.add_key(KEY, principal("cred-bounds"))
    client = stack.client(await stack.limited_router())
    request = stream()
    build(request)  # type: ignore[operator]
    exc = await refusal(drain(client.StreamGenerate(request, metadata=bearer(KEY))))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = details_of(exc)
    assert details.metadata.get("field") == field
    assert not worker.generation.requests


async def test_public_continuation_token_ids_are_refused(stack: SecurityStack) -> None:
    """Attack: 1,000 prompt tokens smuggled as continuation_token_ids were prefilled by
    the worker but billed as 8 tokens. Continuation is the router's own resume
    mechanism: a public caller setting it gets INVALID_ARGUMENT naming the field."""
    worker = await stack.add_worker()
    stack.auth.state.add_key(KEY, principal("cred-cont"))
    client = stack.client(await stack.limited_router())
    request = stream(continuation_token_ids=[5] * 1000)
    request.sampling.max_tokens = 1004
    exc = await refusal(drain(client.StreamGenerate(request, metadata=bearer(KEY))))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = details_of(exc)
    assert details.metadata.get("field") == "continuation_token_ids"
    unary = gen.GenerateRequest(model=MODEL, prompt="hello", continuation_token_ids=[5])
    exc = await refusal(client.Generate(unary, metadata=bearer(KEY)))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not worker.generation.requests
