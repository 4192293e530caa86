"""n samples per request: one prefill, seeds seed + index, per-sample ends, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from services.inference.engine import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    InvalidRequest,
    TokenEvent,
)
from services.inference.model_loading import LoadedModel
from tests.unit.inference.conftest import EngineFactory
from tests.unit.inference.helpers import collect, request

pytestmark = pytest.mark.timeout(60)
SAMPLED: dict[str, Any] = {
    "temperature": 1.0,
    "top_p": 0.95,
    "top_k": 100,
    "max_tokens": 16,
    "ignore_eos": True,
}


def by_index(events: list[TokenEvent]) -> dict[int, list[int]]:
    """The generated token ids of each sample."""
    out: dict[int, list[int]] = {}
    for event in events:
        if event.token_id >= 0:
            out.setdefault(event.index, []).append(event.token_id)
    return out


def finishes(events: list[TokenEvent]) -> dict[int, str]:
    return {e.index: e.finish for e in events if e.finish is not None}


async def test_seeded_samples_equal_single_requests_seeded_seed_plus_index(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    together = await collect(
        engine, dataclasses.replace(request(prompts[4], seed=50, **SAMPLED), n=3)
    )
    alone = [
        [e.token_id for e in await collect(engine, request(prompts[4], seed=50 + i, **SAMPLED))]
        for i in range(3)
    ]
    samples = by_index(together)
    assert [samples[i] for i in range(3)] == alone
    assert len({tuple(s) for s in alone}) == 3  # the seeds really differ
    assert finishes(together) == {0: FINISH_LENGTH, 1: FINISH_LENGTH, 2: FINISH_LENGTH}


async def test_samples_batched_with_other_requests_keep_their_tokens(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    alone = by_index(
        await collect(engine, dataclasses.replace(request(prompts[2], seed=9, **SAMPLED), n=2))
    )
    others = [
        collect(engine, request(p, f"o{i}", seed=i, **SAMPLED)) for i, p in enumerate(prompts[5:])
    ]
    batched, *_ = await asyncio.gather(
        collect(engine, dataclasses.replace(request(prompts[2], "b", seed=9, **SAMPLED), n=2)),
        *others,
    )
    assert by_index(batched) == alone


async def test_greedy_samples_are_identical(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    events = await collect(
        engine, dataclasses.replace(request(prompts[1], temperature=0.0, max_tokens=10), n=2)
    )
    samples = by_index(events)
    assert samples[0] == samples[1]
    assert len(samples[0]) == 10


async def test_the_prompt_is_prefilled_once(
    tiny: LoadedModel, make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(prefix_cache=False)  # no reuse across requests: forks alone share
    prompt = prompts[7]
    await collect(engine, dataclasses.replace(request(prompt, seed=1, **SAMPLED), n=4))
    stats = engine.stats()
    assert stats.total_prefill_tokens == len(prompt)
    assert stats.total_forks == 3
    assert stats.total_generated_tokens == 4 * SAMPLED["max_tokens"]
    assert stats.total_prompt_tokens == len(prompt)
    await collect(engine, request(prompt, seed=1, **SAMPLED))
    assert engine.stats().total_prefill_tokens == 2 * len(prompt)  # n=1 computes it as well


async def test_samples_end_on_their_own(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    base = request(prompts[3], seed=3, **SAMPLED)
    first = by_index(await collect(engine, dataclasses.replace(base, n=3)))
    stop = first[1][0]
    assert stop not in first[0]  # so sample 0 runs on after sample 1 ended
    stopping = dataclasses.replace(base.sampling, stop_token_ids=frozenset({stop}))
    events = await collect(engine, dataclasses.replace(base, sampling=stopping, n=3))
    # Each sample is cut at its own first stop token; the others are untouched.
    expected = {i: s[: s.index(stop) + 1] if stop in s else s for i, s in first.items()}
    assert by_index(events) == expected
    assert finishes(events) == {
        i: FINISH_STOP if stop in s else FINISH_LENGTH for i, s in first.items()
    }
    assert expected[1] == [stop] and finishes(events)[0] == FINISH_LENGTH
    assert engine.stats().running == 0


async def test_n_above_the_running_slots_is_refused(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=2)
    with pytest.raises(InvalidRequest) as caught:
        engine.generate(dataclasses.replace(request(prompts[0]), n=3))
    assert caught.value.field == "n"


async def test_cancelling_frees_every_sample(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=4)
    stream = engine.generate(
        dataclasses.replace(request(prompts[4], seed=2, **(SAMPLED | {"max_tokens": 500})), n=4)
    )
    seen: set[int] = set()
    async for batch in stream:
        seen.update(e.index for e in batch)
        if seen == {0, 1, 2, 3}:
            break
    assert engine.stats().running == 4
    await stream.aclose()  # type: ignore[attr-defined]
    await engine.wait_idle()
    stats = engine.stats()
    assert (stats.running, stats.queued, stats.total_cancelled) == (0, 0, 4)


async def test_engine_stop_cancels_queued_samples(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=2, start=False)
    stream = engine.generate(dataclasses.replace(request(prompts[0], seed=2, **SAMPLED), n=2))
    await engine.stop()
    events = [e async for batch in stream for e in batch]
    assert finishes(events) == {0: FINISH_CANCELLED, 1: FINISH_CANCELLED}
