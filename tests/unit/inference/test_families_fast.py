"""Each fast-path family's greedy output equals transformers' generate, token for token.

Alone, batched, over a reused cached prefix and after a resume (continuation), on
tiny random-weight models in float32 (families.py).
"""

from __future__ import annotations

import asyncio

import pytest

from services.inference.engine import TokenEvent
from services.inference.engine.families import UnsupportedModelError
from services.inference.engine.runner import Runner
from services.inference.model_loading import LoadedModel
from tests.unit.inference.conftest import EngineFactory
from tests.unit.inference.families import FAST_FAMILIES, build_family
from tests.unit.inference.helpers import collect, hf_greedy, request

pytestmark = pytest.mark.timeout(120)
NEW = 12
_models: dict[str, LoadedModel] = {}


@pytest.fixture(params=sorted(FAST_FAMILIES))
def family(request: pytest.FixtureRequest, tiny: LoadedModel) -> LoadedModel:
    name: str = request.param
    if name not in _models:
        _models[name] = build_family(name, tiny.tokenizer, seed=len(_models) + 1)
    return _models[name]


def ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


async def test_greedy_alone_and_batched_matches_generate(
    make_engine: EngineFactory, family: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine(family)
    assert engine.path == "fast"
    references = [hf_greedy(family, p, NEW) for p in prompts]
    for prompt, expected in zip(prompts[:3], references, strict=False):
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
    assert len({tuple(r) for r in references}) > 1  # the prompts really steer the model


async def test_chunked_prefill_and_a_reused_prefix_match_generate(
    make_engine: EngineFactory, family: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine(family, prefix_block_size=8, max_batch_tokens=20)
    system = prompts[7]  # a shared "system prompt" of several blocks
    for tail in (prompts[0], prompts[2]):
        prompt = system + tail
        events = await collect(engine, request(prompt, temperature=0.0, max_tokens=NEW))
        assert ids(events) == hf_greedy(family, prompt, NEW)
    stats = engine.stats()
    assert stats.prefix_cache_hits == 1
    assert stats.prefix_cache_reused_tokens >= len(system) - 8


async def test_resume_continues_the_same_greedy_stream(
    make_engine: EngineFactory, family: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine(family)
    full = hf_greedy(family, prompts[4], 16)
    resumed = await collect(
        engine, request(prompts[4], continuation=full[:6], temperature=0.0, max_tokens=16)
    )
    assert ids(resumed) == full[6:]


def test_a_sliding_window_caps_the_context_and_unknown_families_go_generic(
    tiny: LoadedModel,
) -> None:
    mistral = _models.get("mistral") or build_family("mistral", tiny.tokenizer)
    assert Runner(mistral.model).context_length == 256  # the window, not 512 positions
    gpt2 = build_family("gpt2", tiny.tokenizer)
    with pytest.raises(UnsupportedModelError, match="'gpt2' has no fast path"):
        Runner(gpt2.model)
