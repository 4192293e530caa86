"""The engine's greedy output equals transformers' generate, alone and batched."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.inference.engine import FINISH_LENGTH, FINISH_STOP
from services.inference.model_loading import LoadedModel
from tests.unit.inference.conftest import EngineFactory
from tests.unit.inference.helpers import collect, hf_greedy, request

pytestmark = pytest.mark.timeout(60)
NEW = 12


@pytest.fixture(scope="module")
def references(tiny: LoadedModel, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(tiny, p, NEW) for p in prompts]


async def test_greedy_alone_matches_generate(
    make_engine: EngineFactory, prompts: list[list[int]], references: list[list[int]]
) -> None:
    engine = make_engine()
    for prompt, expected in zip(prompts, references, strict=True):
        events = await collect(engine, request(prompt, temperature=0.0, max_tokens=NEW))
        assert [e.token_id for e in events] == expected
        assert events[-1].finish in (FINISH_LENGTH, FINISH_STOP)
        assert all(e.finish is None for e in events[:-1])


async def test_greedy_batched_matches_generate(
    make_engine: EngineFactory, prompts: list[list[int]], references: list[list[int]]
) -> None:
    engine = make_engine()
    results = await asyncio.gather(
        *(
            collect(engine, request(p, f"r{i}", temperature=0.0, max_tokens=NEW))
            for i, p in enumerate(prompts)
        )
    )
    assert [[e.token_id for e in events] for events in results] == references
    assert engine.stats().total_steps < len(prompts) * NEW  # they really shared steps


async def test_chunked_prefill_matches_generate(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    # A 9-token budget splits every long prompt into several chunks.
    engine = make_engine(max_running=4, max_batch_tokens=9)
    long_prompt = prompts[7] + prompts[4]
    events = await collect(engine, request(long_prompt, temperature=0.0, max_tokens=NEW))
    assert [e.token_id for e in events] == hf_greedy(tiny, long_prompt, NEW)


async def test_long_prefill_does_not_stall_running_streams(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=4, max_batch_tokens=12)
    arrivals: list[tuple[str, float]] = []
    first_token = asyncio.Event()

    async def consume(name: str, prompt: list[int], max_tokens: int) -> None:
        async for batch in engine.generate(
            request(prompt, name, temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ):
            arrivals.extend((name, time.monotonic()) for _ in batch)
            first_token.set()

    runner = asyncio.create_task(consume("a", prompts[0], 200))
    await first_token.wait()
    long_prompt = (prompts[7] * 4)[:300]  # needs about 27 prefill chunks of 11 tokens
    await consume("b", long_prompt, 1)
    await runner
    first_b = next(i for i, (name, _) in enumerate(arrivals) if name == "b")
    a_before_b = sum(1 for name, _ in arrivals[:first_b] if name == "a")
    # "a" kept decoding one token per step while "b"'s prompt was computed in chunks.
    assert a_before_b >= 20


async def test_greedy_matches_generate_over_a_cache_larger_than_the_sequences(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    # The long request grows every slot's cache to 320 positions, then finishes; the
    # short ones go on decoding over that mostly unused cache (attention reads up to
    # the longest row only) after sharing steps with it (rows of unequal lengths).
    engine = make_engine(max_running=4)
    long_prompt = (prompts[7] * 8)[:280]
    shorts = [prompts[0], prompts[2], prompts[5]]
    results = await asyncio.gather(
        collect(engine, request(long_prompt, "long", temperature=0.0, max_tokens=3)),
        *(
            collect(engine, request(p, f"s{i}", temperature=0.0, max_tokens=30))
            for i, p in enumerate(shorts)
        ),
    )
    expected = [hf_greedy(tiny, long_prompt, 3)] + [hf_greedy(tiny, p, 30) for p in shorts]
    assert [[e.token_id for e in events] for events in results] == expected
