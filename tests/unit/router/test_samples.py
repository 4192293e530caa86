"""`n` samples through the router: real tiny worker, usage, the cap, limits, the writer."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.status import details_of
from services.router.writer import Writer
from tests.conftest import eventually
from tests.doubles.fake_auth import principal
from tests.unit.inference_service.harness import MODEL as TINY
from tests.unit.inference_service.harness import serving
from tests.unit.router.conftest import MODEL, Stack, bearer

pytestmark = pytest.mark.timeout(60)


def seeded(seed: int, max_tokens: int = 6) -> gen.SamplingParams:
    return gen.SamplingParams(
        max_tokens=max_tokens, temperature=1.0, top_k=50, ignore_eos=True, seed=seed
    )


async def test_n3_through_the_router_equals_three_seeded_requests(stack: Stack) -> None:
    async with serving() as worker:
        app = await stack.router(workers=(f"127.0.0.1:{worker.app.port}",))
        client = stack.client(app)
        reply = await client.Generate(
            gen.GenerateRequest(model=TINY, prompt="one two", n=3, sampling=seeded(70)),
            metadata=bearer(),
        )
        alone = [
            await client.Generate(
                gen.GenerateRequest(model=TINY, prompt="one two", sampling=seeded(70 + i)),
                metadata=bearer(),
            )
            for i in range(3)
        ]
        call = client.StreamGenerate(
            gen.StreamGenerateRequest(model=TINY, prompt="one two", n=3, sampling=seeded(70)),
            metadata=bearer(),
        )
        stream = [m async for m in call]
        await app.core.drain_background()
    assert [list(c.token_ids) for c in reply.choices] == [list(a.token_ids) for a in alone]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.text == alone[0].text
    per_index: dict[int, list[int]] = {}
    for message in stream:
        per_index.setdefault(message.index, []).extend(message.token_ids)
    assert per_index == {i: list(a.token_ids) for i, a in enumerate(alone)}
    assert sorted(m.index for m in stream if m.finish_reason) == [0, 1, 2]
    prompt = alone[0].usage.prompt_tokens
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt, 18)
    # The ledger: the prompt once and every sample's tokens, for the unary and the stream.
    await eventually(lambda: len(stack.auth.state.usage) == 5)
    totals = sorted((r.prompt_tokens, r.completion_tokens) for r in stack.auth.state.usage.values())
    assert totals == [(prompt, 6)] * 3 + [(prompt, 18)] * 2


async def test_n_above_the_router_cap_is_refused_naming_n(stack: Stack) -> None:
    worker = await stack.add_worker()
    client = stack.client(await stack.router(max_n=2))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.Generate(gen.GenerateRequest(model=MODEL, prompt="hi", n=3), metadata=bearer())
    details = details_of(caught.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.metadata["field"] == "n"
    assert details.message == "n: at most 2 samples per request (got 3)"
    assert worker.generation.requests == []  # refused before any worker
    ok = await client.Generate(
        gen.GenerateRequest(
            model=MODEL, prompt="hi", n=2, sampling=gen.SamplingParams(max_tokens=3)
        ),
        metadata=bearer(),
    )
    assert [len(c.token_ids) for c in ok.choices] == [3, 3]


@pytest.mark.parametrize(
    ("n", "second"), [(3, grpc.StatusCode.RESOURCE_EXHAUSTED), (2, grpc.StatusCode.OK)]
)
async def test_limits_reserve_n_times_max_tokens(
    stack: Stack, n: int, second: grpc.StatusCode
) -> None:
    """While a stream of n samples runs, it holds prompt + n x max_tokens of the minute's
    100 tokens: 5 + 3 x 40 = 125 leaves nothing for the next request, 5 + 2 x 40 = 85
    leaves room."""
    await stack.add_worker(token_delay=0.02)
    key = "ty_sk_nsamples0000000000000000000001"
    stack.auth.state.add_key(
        key, principal("cred-n", user_id=f"u-n{n}", limits=res.Limits(tokens_per_minute=100))
    )
    client = stack.client(await stack.router())

    def ask(samples: int) -> gen.StreamGenerateRequest:
        # "hello": at most 5 prompt tokens reserved; 40 per sample.
        return gen.StreamGenerateRequest(
            model=MODEL, prompt="hello", n=samples, sampling=gen.SamplingParams(max_tokens=40)
        )

    first = client.StreamGenerate(ask(n), metadata=bearer(key))
    assert (await first.read()).token_ids  # admitted and running
    try:
        outcome = grpc.StatusCode.OK
        try:
            async for _ in client.StreamGenerate(ask(1), metadata=bearer(key)):
                pass
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code()
        assert outcome == second
    finally:
        first.cancel()


async def test_the_writer_never_merges_messages_of_different_samples() -> None:
    gate = asyncio.Event()
    written: list[gen.StreamGenerateResponse] = []

    async def emit(payload: bytes | gen.StreamGenerateResponse) -> None:
        assert isinstance(payload, gen.StreamGenerateResponse)
        written.append(payload)
        await gate.wait()

    writer = Writer(emit)

    def msg(index: int, token: int, finish: bool = False) -> gen.StreamGenerateResponse:
        return gen.StreamGenerateResponse(
            index=index,
            token_ids=[token],
            text=f"t{token}",
            finish_reason=gen.FINISH_REASON_LENGTH if finish else gen.FINISH_REASON_UNSPECIFIED,
        )

    for message in (msg(0, 1), msg(1, 2), msg(1, 3), msg(0, 4), msg(0, 5, True), msg(0, 6)):
        writer.send(None, message)  # the first write is in flight: the rest wait
    gate.set()
    await writer.flush()
    got = [(m.index, list(m.token_ids)) for m in written]
    assert got == [(0, [1]), (1, [2, 3]), (0, [4, 5]), (0, [6])]
