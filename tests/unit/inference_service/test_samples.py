"""`n` samples through a worker over real gRPC: index, choices, usage, stop strings, cap."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.common.status import details_of
from tests.doubles.tiny_model import build_tokenizer
from tests.unit.inference_service.harness import (
    MODEL,
    as_generate,
    request,
    scripted_model,
    serving,
    stream_all,
)

SAMPLED = gen.SamplingParams(max_tokens=8, temperature=1.0, top_k=50, ignore_eos=True)


def seeded(seed: int) -> gen.SamplingParams:
    params = gen.SamplingParams()
    params.CopyFrom(SAMPLED)
    params.seed = seed
    return params


async def test_seeded_n3_equals_three_requests_seeded_seed_plus_index() -> None:
    async with serving() as w:
        reply = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, prompt="a b c", n=3, sampling=seeded(40))
        )
        alone = [
            await w.gen.Generate(
                gen.GenerateRequest(model=MODEL, prompt="a b c", sampling=seeded(40 + i))
            )
            for i in range(3)
        ]
        stream = await stream_all(w.gen, request(prompt="a b c", n=3, sampling=seeded(40)))
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [list(c.token_ids) for c in reply.choices] == [list(a.token_ids) for a in alone]
    assert [c.text for c in reply.choices] == [a.text for a in alone]
    assert len({c.text for c in reply.choices}) == 3
    # Old clients read choice 0 in the top-level fields.
    assert (reply.text, list(reply.token_ids)) == (alone[0].text, list(alone[0].token_ids))
    # Usage: the prompt once, every sample's completion.
    assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert reply.usage.completion_tokens == 3 * 8
    # The stream carries the same samples by index, each with its own end.
    per_index: dict[int, list[int]] = {}
    ends = [m.index for m in stream if m.finish_reason]
    for message in stream:
        per_index.setdefault(message.index, []).extend(message.token_ids)
    assert per_index == {i: list(a.token_ids) for i, a in enumerate(alone)}
    assert sorted(ends) == [0, 1, 2]
    assert [m.HasField("usage") for m in stream].count(True) == 1
    assert stream[-1].usage.completion_tokens == 24 and stream[-1].finish_reason


async def test_n_zero_or_unset_is_one_sample() -> None:
    async with serving() as w:
        reply = await w.gen.Generate(
            gen.GenerateRequest(model=MODEL, prompt="x", sampling=seeded(1))
        )
    assert len(reply.choices) == 1 and reply.choices[0].text == reply.text


async def test_a_stop_string_ends_only_its_sample() -> None:
    tokenizer: Any = build_tokenizer()
    script = scripted_model(tokenizer, "The capital of France is Paris.")
    async with serving(script.loaded) as w:
        greedy = gen.SamplingParams(max_tokens=100, temperature=0.0, stop=["France"])
        reply = await w.gen.Generate(
            gen.GenerateRequest(
                model=MODEL, token_ids=gen.TokenIds(ids=[script.start_id]), n=2, sampling=greedy
            )
        )
        await w.app.worker.engine.wait_idle()
        assert w.app.worker.engine.stats().running == 0
    assert [c.text for c in reply.choices] == ["The capital of ", "The capital of "]
    assert [c.finish_reason for c in reply.choices] == [gen.FINISH_REASON_STOP_SEQUENCE] * 2


@pytest.mark.parametrize("n", [5, 17])
async def test_n_above_the_cap_is_invalid_argument_naming_n(n: int) -> None:
    # The cap is max_n (16 by default) and never more than the running slots (4 here).
    async with serving() as w:
        for call in (
            lambda: w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="x", n=n)),
            lambda: stream_all(w.gen, request(prompt="x", n=n)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            details = details_of(caught.value)
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT
            assert details.metadata["field"] == "n"
            assert details.message.startswith("n: at most 4 samples")


async def test_max_n_setting_caps_n() -> None:
    async with serving(max_n=2) as w:
        ok = await w.gen.Generate(as_generate(request(prompt="x", n=2, sampling=seeded(3))))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await w.gen.Generate(gen.GenerateRequest(model=MODEL, prompt="x", n=3))
    assert len(ok.choices) == 2
    assert details_of(caught.value).metadata["field"] == "n"
