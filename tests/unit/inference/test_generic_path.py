"""Models without a fast path run on transformers' own forward, under the same engine.

Greedy output equals transformers' generate (alone, batched, under a token budget
smaller than the long prompts, after a resume); seeded sampling, cancellation and
limits behave as on the fast path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from services.inference.engine import NO_TOKEN, Engine, TokenEvent
from services.inference.model_loading import LoadedModel
from tests.conftest import eventually
from tests.unit.inference.conftest import EngineFactory
from tests.unit.inference.families import GENERIC_FAMILIES, build_family
from tests.unit.inference.helpers import collect, hf_greedy, request

pytestmark = pytest.mark.timeout(120)
NEW = 12
_models: dict[str, LoadedModel] = {}


def model_of(name: str, tiny: LoadedModel) -> LoadedModel:
    if name not in _models:
        _models[name] = build_family(name, tiny.tokenizer, seed=10 + len(_models))
    return _models[name]


@pytest.fixture(params=sorted(GENERIC_FAMILIES))
def generic(request: pytest.FixtureRequest, tiny: LoadedModel) -> LoadedModel:
    return model_of(request.param, tiny)


def ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


async def test_greedy_alone_batched_and_over_budget_match_generate(
    make_engine: EngineFactory, generic: LoadedModel, prompts: list[list[int]]
) -> None:
    # Prompts longer than the budget: prefilled whole all the same (longrope needs it).
    engine = make_engine(generic, max_batch_tokens=20)
    assert engine.path == "generic" and not engine.prefix_cache_enabled
    references = [hf_greedy(generic, p, NEW) for p in prompts]
    assert len({tuple(r) for r in references}) > 1
    for prompt, expected in zip(prompts[:2], references, strict=False):
        assert ids(await collect(engine, request(prompt, temperature=0.0, max_tokens=NEW))) == (
            expected
        )
    results = await asyncio.gather(
        *(
            collect(engine, request(p, f"r{i}", temperature=0.0, max_tokens=NEW))
            for i, p in enumerate(prompts)
        )
    )
    assert [ids(events) for events in results] == references
    assert engine.stats().total_steps < len(prompts) * NEW  # they really shared steps


async def test_resume_and_seeded_sampling_match_an_uninterrupted_stream(
    make_engine: EngineFactory, generic: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine(generic)
    full = hf_greedy(generic, prompts[4], 16)
    resumed = await collect(
        engine, request(prompts[4], continuation=full[:6], temperature=0.0, max_tokens=16)
    )
    assert ids(resumed) == full[6:]
    sampled: dict[str, Any] = {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True}
    alone = ids(await collect(engine, request(prompts[2], seed=5, **sampled)))
    batched, *_ = await asyncio.gather(
        collect(engine, request(prompts[2], "b", seed=5, **sampled)),
        *(collect(engine, request(p, f"o{i}", seed=i, **sampled)) for i, p in enumerate(prompts)),
    )
    assert ids(batched) == alone
    other = ids(await collect(engine, request(prompts[2], seed=6, **sampled)))
    assert other != alone  # the seed really drives the draw
    again = request(prompts[2], continuation=alone[:5], seed=5, **sampled)
    assert ids(await collect(engine, again)) == alone[5:]


async def test_closing_a_stream_frees_its_slot_and_the_rest_go_on(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    gpt2 = model_of("gpt2", tiny)
    engine: Engine = make_engine(gpt2, max_running=2)
    endless: dict[str, Any] = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0}
    stream = engine.generate(request(prompts[0], "a", **endless))
    other = asyncio.create_task(collect(engine, request(prompts[1], "b", temperature=0.0)))
    first = await anext(stream)
    assert first[0].token_id != NO_TOKEN
    await stream.aclose()  # type: ignore[attr-defined]
    await eventually(lambda: engine.stats().total_cancelled == 1, interval=0.002)
    assert ids(await other) == hf_greedy(gpt2, prompts[1], 12)  # its slot moved, intact
    await eventually(lambda: engine.stats().running == 0, interval=0.002)
    assert engine.stats().free_slots == 2


async def test_the_engine_logs_which_path_a_model_took(
    make_engine: EngineFactory, tiny: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.inference.engine")
    assert make_engine(model_of("opt", tiny), start=False).path == "generic"
    assert make_engine(tiny, start=False).path == "fast"
    assert "tiny-opt runs on the generic path" in caplog.text
    assert "model type opt: generic transformers path (model type 'opt' has no fast" in (
        caplog.text
    )
    assert "tiny-llama runs on the fast path" in caplog.text
