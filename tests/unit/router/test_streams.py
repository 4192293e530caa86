"""Streams through the router: failover, resume, cancellation, usage, coalescing."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen

from tests.conftest import WAIT_TIMEOUT, eventually
from tests.doubles.fake_worker import expected_token, token_text
from tests.unit.router.conftest import MODEL, Stack, bearer


def request(prompt: str = "hello", max_tokens: int = 8) -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model=MODEL, prompt=prompt)
    req.sampling.max_tokens = max_tokens
    return req


async def collect(call: grpc.aio.UnaryStreamCall) -> list[gen.StreamGenerateResponse]:  # type: ignore[type-arg]
    return [msg async for msg in call]


async def test_generate_unary_returns_the_whole_completion(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    req = gen.GenerateRequest(model=MODEL, prompt="hi", request_id="mine")
    req.sampling.max_tokens = 3
    reply = await client.Generate(req, metadata=bearer())
    sreq = request("hi", 3)
    assert list(reply.token_ids) == [expected_token(sreq, i) for i in range(3)]
    assert reply.text == "".join(token_text(t) for t in reply.token_ids)
    assert reply.request_id == "mine"
    assert reply.finish_reason == gen.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 3


async def test_failover_before_first_token_is_invisible(stack: Stack) -> None:
    dead = await stack.add_worker()
    await stack.add_worker()
    app = await stack.router(policy="round_robin")
    client = stack.client(app)
    await dead.stop()  # the router has not noticed yet
    for _ in range(4):
        msgs = await collect(client.StreamGenerate(request(), metadata=bearer()))
        assert msgs[-1].finish_reason == gen.FINISH_REASON_LENGTH


async def test_full_worker_is_replaced_by_another(stack: Stack) -> None:
    full = await stack.add_worker(max_running=0)
    await stack.add_worker()
    client = stack.client(await stack.router(policy="round_robin"))
    for _ in range(4):
        msgs = await collect(client.StreamGenerate(request(), metadata=bearer()))
        assert msgs[-1].finish_reason
    assert full.load.running == 0


async def test_worker_dying_mid_stream_is_resumed_without_gap_or_repeat(stack: Stack) -> None:
    first = await stack.add_worker(token_delay=0.01)
    second = await stack.add_worker(token_delay=0.01)
    client = stack.client(await stack.router())
    req = request("resume me", 60)
    call = client.StreamGenerate(req, metadata=bearer())
    tokens: list[int] = []
    text = ""
    async for msg in call:
        tokens.extend(msg.token_ids)
        text += msg.text
        if len(tokens) == 10:
            busy = first if first.load.running else second
            await busy.stop()
    assert tokens == [expected_token(req, i) for i in range(60)]
    assert text == "".join(token_text(t) for t in tokens)
    survivor = second if busy is first else first
    resumed = survivor.generation.requests[-1]
    assert len(resumed.continuation_token_ids) >= 10


async def test_stream_ends_unavailable_when_nobody_can_resume(stack: Stack) -> None:
    only = await stack.add_worker(token_delay=0.01)
    client = stack.client(await stack.router())
    call = client.StreamGenerate(request(max_tokens=200), metadata=bearer())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            await only.stop()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_client_cancel_stops_the_worker_and_frees_the_slot(stack: Stack) -> None:
    from tokenyard.auth.v1 import resources_pb2 as res

    from tests.doubles.fake_auth import principal

    stack.auth.state.add_key(
        "ty_sk_one", principal("cred-1s", limits=res.Limits(concurrent_streams=1))
    )
    worker = await stack.add_worker(token_delay=0.01)
    app = await stack.router()
    client = stack.client(app)
    call = client.StreamGenerate(request(max_tokens=4000), metadata=bearer("ty_sk_one"))
    await call.read()
    call.cancel()
    await eventually(lambda: worker.load.running == 0)
    await app.core.drain_background()
    msgs = await collect(client.StreamGenerate(request(), metadata=bearer("ty_sk_one")))
    assert msgs[-1].finish_reason


async def test_usage_is_recorded_exactly_per_request(stack: Stack) -> None:
    await stack.add_worker()
    app = await stack.router()
    client = stack.client(app)
    for n in (3, 5, 7):
        await collect(client.StreamGenerate(request("one two three", n), metadata=bearer()))
    await app.core.drain_background()
    await eventually(lambda: len(stack.auth.state.usage) == 3)
    records = sorted(stack.auth.state.usage.values(), key=lambda r: r.completion_tokens)
    assert [r.completion_tokens for r in records] == [3, 5, 7]
    assert {r.prompt_tokens for r in records} == {3}
    assert {r.credential_id for r in records} == {"cred-1"}
    assert {r.status for r in records} == {"OK"}


async def test_cancelled_stream_is_billed_for_what_was_received(stack: Stack) -> None:
    await stack.add_worker(token_delay=0.01)
    app = await stack.router()
    client = stack.client(app)
    call = client.StreamGenerate(request("a b c d", 4000), metadata=bearer())
    received = 0
    async for msg in call:
        received += len(msg.token_ids)
        if received >= 5:
            call.cancel()
            break
    await eventually(lambda: len(stack.auth.state.usage) == 1)
    (record,) = stack.auth.state.usage.values()
    assert record.status == "CANCELLED"
    assert record.prompt_tokens == 4
    assert record.completion_tokens >= received


async def test_usage_waits_for_auth_and_is_exact_after_restart(stack: Stack) -> None:
    await stack.add_worker()
    app = await stack.router()
    client = stack.client(app)
    await collect(client.StreamGenerate(request(), metadata=bearer()))  # caches the principal
    await eventually(lambda: len(stack.auth.state.usage) == 1)
    await stack.auth.stop()
    for _ in range(5):
        await collect(client.StreamGenerate(request(max_tokens=2), metadata=bearer()))
    await app.core.drain_background()
    await eventually(lambda: len(app.usage) == 5)
    await stack.auth.start()
    await eventually(lambda: len(stack.auth.state.usage) == 6)
    assert sum(r.completion_tokens for r in stack.auth.state.usage.values()) == 8 + 5 * 2


async def test_stream_interval_merges_tokens_into_fewer_messages(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router(stream_interval=4))
    req = request(max_tokens=10)
    msgs = await collect(client.StreamGenerate(req, metadata=bearer()))
    assert [len(m.token_ids) for m in msgs] == [4, 4, 2]
    tokens = [t for m in msgs for t in m.token_ids]
    assert tokens == [expected_token(req, i) for i in range(10)]
    assert "".join(m.text for m in msgs) == "".join(token_text(t) for t in tokens)
    assert msgs[-1].usage.completion_tokens == 10


async def test_revoked_key_is_refused_within_the_bound(stack: Stack) -> None:
    await stack.add_worker()
    client = stack.client(await stack.router())
    await collect(client.StreamGenerate(request(), metadata=bearer()))
    from tests.unit.router.conftest import KEY

    stack.auth.state.revoke(KEY)

    async def refused() -> bool:
        try:
            await collect(client.StreamGenerate(request(), metadata=bearer()))
        except grpc.aio.AioRpcError as exc:
            return bool(exc.code() == grpc.StatusCode.UNAUTHENTICATED)
        return False

    deadline = asyncio.get_running_loop().time() + WAIT_TIMEOUT
    while asyncio.get_running_loop().time() < deadline:
        if await refused():
            return
        await asyncio.sleep(0.01)
    pytest.fail("revoked key still served")


async def test_list_models_and_count_tokens(stack: Stack) -> None:
    await stack.add_worker(model="alpha")
    await stack.add_worker(model="beta")
    await stack.add_worker(model="beta")
    from tests.doubles.fake_auth import principal

    stack.auth.state.add_key("ty_sk_beta", principal("cred-b", models=("beta",)))
    client = stack.client(await stack.router())
    every = await client.ListModels(gen.ListModelsRequest(), metadata=bearer())
    assert [(m.name, m.workers) for m in every.models] == [("alpha", 1), ("beta", 2)]
    page = await client.ListModels(gen.ListModelsRequest(page_size=1), metadata=bearer())
    rest = await client.ListModels(
        gen.ListModelsRequest(page_token=page.next_page_token), metadata=bearer()
    )
    assert [m.name for m in [*page.models, *rest.models]] == ["alpha", "beta"]
    narrow = await client.ListModels(gen.ListModelsRequest(), metadata=bearer("ty_sk_beta"))
    assert [m.name for m in narrow.models] == ["beta"]
    count = await client.CountTokens(
        gen.CountTokensRequest(model="beta", prompt="a b c"), metadata=bearer()
    )
    assert count.token_count == 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.CountTokens(
            gen.CountTokensRequest(model="alpha", prompt="a"), metadata=bearer("ty_sk_beta")
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_least_load_spreads_concurrent_streams(stack: Stack) -> None:
    workers = [await stack.add_worker(token_delay=0.02) for _ in range(2)]
    client = stack.client(await stack.router())
    calls = [client.StreamGenerate(request(max_tokens=30), metadata=bearer()) for _ in range(8)]
    for call in calls:
        await call.read()
    assert sorted(w.load.running for w in workers) == [4, 4]
    for call in calls:
        call.cancel()


async def test_affinity_key_keeps_a_key_on_one_worker(stack: Stack) -> None:
    workers = [await stack.add_worker() for _ in range(3)]
    client = stack.client(await stack.router(policy="affinity_key"))
    for i in range(6):
        req = request(f"prompt {i}", 2)
        req.affinity_key = "session-42"
        await collect(client.StreamGenerate(req, metadata=bearer()))
    assert sorted(len(w.generation.requests) for w in workers) == [0, 0, 6]


async def test_prefix_affinity_sends_shared_prefixes_to_one_worker(stack: Stack) -> None:
    workers = [await stack.add_worker() for _ in range(3)]
    client = stack.client(await stack.router(policy="prefix_affinity"))
    system = "You are a careful assistant who answers briefly. " * 4
    for i in range(6):
        await collect(
            client.StreamGenerate(request(system + f"question {i}", 2), metadata=bearer())
        )
    assert sorted(len(w.generation.requests) for w in workers) == [0, 0, 6]
