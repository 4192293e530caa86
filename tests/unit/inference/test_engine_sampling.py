"""Per-request sampling: seeds, resume, stop tokens, filters, penalties, logprobs."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import pytest
import torch

from services.inference.engine import FINISH_LENGTH, FINISH_STOP, InvalidRequest, Sampling
from services.inference.engine.sampling import SampleRow, sample
from services.inference.model_loading import LoadedModel
from tests.unit.inference.conftest import EngineFactory
from tests.unit.inference.helpers import collect, hf_greedy, request

pytestmark = pytest.mark.timeout(60)
SAMPLED: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 0.95,
    "top_k": 100,
    "max_tokens": 16,
    "ignore_eos": True,
}


def ids(events: list) -> list[int]:  # type: ignore[type-arg]
    return [e.token_id for e in events]


async def test_seeded_sampling_same_alone_and_batched(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    alone = ids(await collect(engine, request(prompts[2], seed=1234, **SAMPLED)))
    others = [
        collect(engine, request(p, f"o{i}", seed=i, **SAMPLED)) for i, p in enumerate(prompts[3:])
    ]
    batched, *_ = await asyncio.gather(
        collect(engine, request(prompts[2], "b", seed=1234, **SAMPLED)), *others
    )
    assert ids(batched) == alone
    other_seed = ids(await collect(engine, request(prompts[2], seed=99, **SAMPLED)))
    assert other_seed != alone  # the seed really drives the draw


async def test_unseeded_requests_differ(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    runs = [ids(await collect(engine, request(prompts[1], **SAMPLED))) for _ in range(3)]
    assert len({tuple(r) for r in runs}) > 1


@pytest.mark.parametrize(
    "sampling", [SAMPLED | {"seed": 7}, {"temperature": 0.0, "max_tokens": 16}]
)
async def test_continuation_resumes_the_same_stream(
    make_engine: EngineFactory, prompts: list[list[int]], sampling: dict[str, object]
) -> None:
    engine = make_engine()
    full = ids(await collect(engine, request(prompts[4], **sampling)))  # type: ignore[arg-type]
    assert len(full) == 16
    resumed = await collect(
        engine,
        request(prompts[4], continuation=full[:6], **sampling),  # type: ignore[arg-type]
    )
    assert ids(resumed) == full[6:]
    assert resumed[-1].finish == FINISH_LENGTH


async def test_stop_token_ids_and_eos(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    greedy = hf_greedy(tiny, prompts[2], 12)
    stop = greedy[4]
    cut = greedy.index(stop) + 1
    engine = make_engine()
    events = await collect(
        engine, request(prompts[2], temperature=0.0, stop_token_ids=frozenset({stop}))
    )
    assert ids(events) == greedy[:cut]
    assert events[-1].finish == FINISH_STOP

    as_eos = make_engine(dataclasses.replace(tiny, eos_token_ids=frozenset({stop})))
    events = await collect(as_eos, request(prompts[2], temperature=0.0))
    assert ids(events) == greedy[:cut] and events[-1].finish == FINISH_STOP
    events = await collect(as_eos, request(prompts[2], temperature=0.0, ignore_eos=True))
    assert ids(events) == greedy and events[-1].finish == FINISH_LENGTH


async def test_max_tokens_is_exact(make_engine: EngineFactory, prompts: list[list[int]]) -> None:
    engine = make_engine()
    events = await collect(engine, request(prompts[0], max_tokens=5, ignore_eos=True, seed=3))
    assert len(events) == 5 and events[-1].finish == FINISH_LENGTH


@pytest.mark.parametrize(
    "filters", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}], ids=["top_k", "top_p", "min_p"]
)
async def test_tight_filters_reduce_to_greedy(
    make_engine: EngineFactory,
    tiny: LoadedModel,
    prompts: list[list[int]],
    filters: dict[str, float],
) -> None:
    engine = make_engine()
    events = await collect(
        engine,
        request(prompts[3], temperature=1.5, seed=5, max_tokens=12, **filters),  # type: ignore[arg-type]
    )
    assert ids(events) == hf_greedy(tiny, prompts[3], 12)


async def test_repetition_penalty_matches_transformers(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    events = await collect(
        engine, request(prompts[5], temperature=0.0, repetition_penalty=1.5, max_tokens=12)
    )
    expected = hf_greedy(tiny, prompts[5], 12, repetition_penalty=1.5)
    assert ids(events) == expected
    assert expected != hf_greedy(tiny, prompts[5], 12)  # the penalty changed the output


async def test_logprobs(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    events = await collect(engine, request(prompts[2], temperature=0.0, logprobs=3))
    with torch.no_grad():
        logits = tiny.model(torch.tensor([prompts[2]])).logits[0, -1]
    expected_first = torch.log_softmax(logits.float(), -1)[events[0].token_id].item()
    assert events[0].logprob == pytest.approx(expected_first, abs=1e-4)
    for event in events:
        assert event.logprob is not None and event.logprob <= 0.0
        values = [lp for _, lp in event.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        # greedy: the chosen token is the most likely one
        assert event.top_logprobs[0][0] == event.token_id
        assert math.isclose(event.top_logprobs[0][1], event.logprob, abs_tol=1e-6)
    plain = await collect(engine, request(prompts[2], temperature=0.0))
    assert all(e.logprob is None and e.top_logprobs == () for e in plain)


def test_sampling_follows_the_distribution() -> None:
    # Two tokens with probabilities 0.75 / 0.25: seeded draws over many positions
    # land near those frequencies, and min_p 0.5 removes the rarer one.
    logits = torch.log(torch.tensor([[0.75, 0.25, 0.0]])).float()
    config = Sampling(max_tokens=1, temperature=1.0)
    draws = [sample(logits, [SampleRow(config, 11, pos, [])])[0].token_id for pos in range(2000)]
    assert 0.70 < draws.count(0) / len(draws) < 0.80
    assert 2 not in draws
    strict = dataclasses.replace(config, min_p=0.5)
    assert {sample(logits, [SampleRow(strict, 11, p, [])])[0].token_id for p in range(200)} == {0}


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("max_tokens", {"max_tokens": 0}),
        ("top_p", {"top_p": 0.0}),
        ("temperature", {"temperature": -1.0}),
        ("logprobs", {"logprobs": 99}),
        ("repetition_penalty", {"repetition_penalty": 0.0}),
    ],
)
async def test_invalid_sampling_is_rejected(
    make_engine: EngineFactory, prompts: list[list[int]], field: str, change: dict[str, float]
) -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequest) as info:
        engine.generate(request(prompts[0], **change))  # type: ignore[arg-type]
    assert info.value.field == field


async def test_invalid_prompts_are_rejected(make_engine: EngineFactory, tiny: LoadedModel) -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequest, match="prompt_ids"):
        engine.generate(request([]))
    with pytest.raises(InvalidRequest, match="prompt_ids"):
        engine.generate(request([10**6]))
    with pytest.raises(InvalidRequest, match="context"):
        engine.generate(request([1] * tiny.context_length))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_takes_the_first_of_tied_scores_as_argmax_does(dtype: torch.dtype) -> None:
    logits = torch.full((3, 50), -1.0, dtype=dtype)
    logits[0, [7, 3, 40]] = 2.0  # a three-way tie: token 3 is first
    logits[1, 49] = 5.0
    logits[2] = 0.0  # every token tied
    rows = [SampleRow(Sampling(temperature=0.0), 0, 0, []) for _ in range(3)]
    assert [s.token_id for s in sample(logits, rows)] == [3, 49, 0]
    assert [s.token_id for s in sample(logits, rows)] == logits.float().argmax(-1).tolist()
