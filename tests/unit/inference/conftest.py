"""Fixtures for the inference engine tests: a tiny random Llama and engine helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from services.inference.engine import Engine
from services.inference.model_loading import LoadedModel
from tests.doubles.tiny_model import build_tiny_model

EngineFactory = Callable[..., Engine]


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """A 2-layer float32 Llama with random weights (float32 for exact comparisons)."""
    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def prompts(tiny: LoadedModel) -> list[list[int]]:
    """Eight prompts of different lengths."""
    texts = [
        "Hello",
        "The quick brown fox",
        "What is the capital of France?",
        "你好\uff0c世界",
        "Once upon a time in a faraway land there lived a curious engineer who",
        "0123456789",
        "Emoji 😀🎉",
        "Continuous batching lets requests join and leave between decode steps. " * 2,
    ]
    return [list(tiny.tokenizer(t)["input_ids"]) for t in texts]


@pytest.fixture
async def make_engine(tiny: LoadedModel) -> AsyncIterator[EngineFactory]:
    """Build started engines over the tiny model; all are stopped after the test."""
    engines: list[Engine] = []

    def factory(loaded: LoadedModel | None = None, *, start: bool = True, **kw: Any) -> Engine:
        options: dict[str, Any] = {"max_running": 8, "max_queued": 8, "max_batch_tokens": 64}
        options.update(kw)
        engine = Engine(loaded or tiny, **options)
        if start:
            engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.stop()
