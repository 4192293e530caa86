"""`priority` through the router: the cap, the range, and the tenant only the router sets."""

from __future__ import annotations

import grpc
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.status import details_of
from services.router.policies import Candidate, free_first
from tests.doubles.fake_auth import principal
from tests.unit.router.conftest import MODEL, Stack, bearer

CAPPED = "ty_sk_testkey0000000000000000000002"


def request(priority: int, tenant: str = "") -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model=MODEL, prompt="hi", priority=priority, tenant=tenant)
    req.sampling.max_tokens = 2
    return req


async def test_priority_within_the_cap_reaches_the_worker_with_the_users_tenant(
    stack: Stack,
) -> None:
    worker = await stack.add_worker()
    stack.auth.state.add_key(
        CAPPED, principal("cred-2", user_id="u-capped", limits=res.Limits(max_priority=3))
    )
    client = stack.client(await stack.router())
    # A caller naming another tenant is ignored: the router stamps the user's id.
    msgs = [m async for m in client.StreamGenerate(request(3, "u-victim"), metadata=bearer(CAPPED))]
    assert msgs[-1].finish_reason == gen.FINISH_REASON_LENGTH
    sent = worker.generation.requests[-1]
    assert (sent.priority, sent.tenant) == (3, "u-capped")


@pytest.mark.parametrize(
    ("key", "priority"), [(CAPPED, 4), ("default", 1)], ids=["above-key-cap", "above-default-0"]
)
async def test_priority_above_the_cap_is_refused_naming_priority(
    stack: Stack, key: str, priority: int
) -> None:
    worker = await stack.add_worker()
    stack.auth.state.add_key(
        CAPPED, principal("cred-2", user_id="u-capped", limits=res.Limits(max_priority=3))
    )
    client = stack.client(await stack.router())
    metadata = bearer() if key == "default" else bearer(key)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in client.StreamGenerate(request(priority), metadata=metadata):
            pass
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    details = details_of(refused.value)
    assert details.reason == "PRIORITY_LIMIT" and details.metadata["field"] == "priority"
    assert not worker.generation.requests  # refused before any worker saw it


async def test_priority_out_of_range_is_invalid(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.Generate(gen.GenerateRequest(model=MODEL, prompt="hi", priority=-5000),
                              metadata=bearer())  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(refused.value).metadata["field"] == "priority"


def test_sheddable_requests_try_workers_with_a_free_slot_first() -> None:
    ordered = [Candidate("a", free_slots=0), Candidate("b", free_slots=2), Candidate("c")]
    assert [c.worker_id for c in free_first(ordered)] == ["b", "a", "c"]
