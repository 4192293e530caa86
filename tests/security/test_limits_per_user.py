"""Item 12.6: role limits count per user across all their credentials; key limits per key."""

from __future__ import annotations

import asyncio

import grpc
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from tests.doubles.fake_auth import principal
from tests.security import router_fixtures
from tests.security.router_fixtures import SecurityStack, bearer, drain, eventually, outcome
from tests.unit.router.conftest import MODEL

stack = router_fixtures.stack  # the fixture, on each limits backend

KEY_A = "ty_sk_useralpha00000000000000000001"
KEY_B = "ty_sk_userbeta000000000000000000001"


def count_request() -> gen.CountTokensRequest:
    return gen.CountTokensRequest(model=MODEL, prompt="hello")


def stream(max_tokens: int) -> gen.StreamGenerateRequest:
    request = gen.StreamGenerateRequest(model=MODEL, prompt="hello")
    request.sampling.max_tokens = max_tokens
    return request


def two_keys(stack: SecurityStack, limits: res.Limits, user_limits: res.Limits | None) -> None:
    """Two credentials (a key and a Login session) of one user, with the same role limits."""
    for key, credential in ((KEY_A, "cred-a"), (KEY_B, "session-b")):
        p = principal(credential, user_id="u-shared", limits=limits)
        if user_limits is not None:
            p.user_limits.CopyFrom(user_limits)
        stack.auth.state.add_key(key, p)


async def test_two_keys_of_one_user_share_the_requests_per_minute(stack: SecurityStack) -> None:
    """Attack: a user limited to 4 requests a minute by their role makes a second key
    (or logs in) and sends 4 requests with each, concurrently: counted per credential,
    all 8 were admitted. Counted per user, 4 are."""
    await stack.add_worker()
    two_keys(stack, res.Limits(requests_per_minute=4), None)
    app = await stack.limited_router()
    client = stack.client(app)
    calls = [client.StreamGenerate(stream(2), metadata=bearer(key)) for key in (KEY_A, KEY_B) * 4]
    codes = await asyncio.gather(*(outcome(drain(c)) for c in calls))
    assert codes.count(grpc.StatusCode.OK) == 4, codes
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, codes


async def test_two_keys_of_one_user_share_the_concurrent_streams(stack: SecurityStack) -> None:
    """Attack: a user allowed 2 concurrent streams holds 2 open with each of two keys;
    counted per credential, 4 ran at once. Counted per user, the third is refused."""
    worker = await stack.add_worker(token_delay=0.05)
    two_keys(stack, res.Limits(concurrent_streams=2), None)
    app = await stack.limited_router()
    client = stack.client(app)
    held = [client.StreamGenerate(stream(1000), metadata=bearer(k)) for k in (KEY_A, KEY_B)]
    for call in held:
        await call.read()  # both are running
    assert worker.load.running == 2
    codes = await asyncio.gather(
        *(
            outcome(drain(client.StreamGenerate(stream(1), metadata=bearer(k))))
            for k in (KEY_A, KEY_B)
        )
    )
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    for call in held:
        call.cancel()

    async def freed() -> bool:
        code = await outcome(drain(client.StreamGenerate(stream(1), metadata=bearer(KEY_B))))
        return bool(code == grpc.StatusCode.OK)

    await eventually(freed)


async def test_a_key_limit_tighter_than_the_role_counts_for_that_key_only(
    stack: SecurityStack,
) -> None:
    """A key narrowed to 2 requests a minute stops at 2, while the user's other key keeps
    the rest of the role's 5: the key's own limit does not eat the user's."""
    await stack.add_worker()
    role = res.Limits(requests_per_minute=5)
    narrowed = principal(
        "cred-narrow", user_id="u-shared", limits=res.Limits(requests_per_minute=2)
    )
    narrowed.user_limits.CopyFrom(role)
    wide = principal("cred-wide", user_id="u-shared", limits=role)
    wide.user_limits.CopyFrom(role)
    stack.auth.state.add_key(KEY_A, narrowed)
    stack.auth.state.add_key(KEY_B, wide)
    app = await stack.limited_router()
    client = stack.client(app)

    async def count(key: str) -> grpc.StatusCode:
        return await outcome(client.CountTokens(count_request(), metadata=bearer(key)))

    assert [await count(KEY_A) for _ in range(3)] == [grpc.StatusCode.OK] * 2 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    assert [await count(KEY_B) for _ in range(4)] == [grpc.StatusCode.OK] * 3 + [
        grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
