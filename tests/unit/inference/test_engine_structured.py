"""Structured output in the engine (tiny random model): masks per row, per sample."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from services.common.grammars import ResponseFormat
from services.inference.engine import Engine, EngineRequest, Sampling, TokenEvent
from services.inference.engine.grammar import GrammarError
from services.inference.model_loading import LoadedModel
from tests.unit.inference.helpers import collect, request

EngineFactory = Callable[..., Engine]

# Short enough for a random model to finish well within the budget.
STATUS = {
    "type": "object",
    "properties": {"status": {"enum": ["open", "closed"]}, "n": {"enum": [1, 2, 3]}},
    "required": ["status", "n"],
    "additionalProperties": False,
}


def grammar(engine: Engine, **fmt: str) -> Any:
    ((kind, text),) = fmt.items()
    return engine.grammars.compile(ResponseFormat(kind, text).grammar())


def text_of(loaded: LoadedModel, events: list[TokenEvent]) -> str:
    ids = [e.token_id for e in events if e.token_id >= 0]
    return str(loaded.tokenizer.decode(ids, skip_special_tokens=True))


def constrained(prompt: list[int], compiled: Any, **sampling: Any) -> EngineRequest:
    sampling.setdefault("max_tokens", 48)
    return EngineRequest("s", prompt, Sampling(**sampling), grammar=compiled, n=1)


async def test_each_sample_follows_the_schema_and_ends_stop(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    req = constrained(prompts[1], grammar(engine, json_schema=json.dumps(STATUS)), seed=5)
    req.n = 3  # each sample needs its own matcher (and shares the prompt's prefill)
    events = await collect(engine, req)
    texts = set()
    for index in range(3):
        mine = [e for e in events if e.index == index]
        assert mine[-1].finish == "stop"
        text = text_of(tiny, mine)
        jsonschema.validate(json.loads(text), STATUS)
        texts.add(text)
    assert len(texts) > 1  # sampled independently, not one matcher shared
    assert engine.stats().total_forks == 2


async def test_a_regex_constrains_greedy_and_sampled_rows(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    compiled = grammar(engine, regex=r"[A-Z]{2}-[0-9]{1,3}")
    for temperature in (0.0, 1.3):
        events = await collect(engine, constrained(prompts[0], compiled, temperature=temperature))
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{1,3}", text_of(tiny, events))
        assert events[-1].finish == "stop"


async def test_max_tokens_still_ends_a_constrained_request_as_length(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    compiled = grammar(engine, regex=r"[a-z]{20}")
    events = await collect(engine, constrained(prompts[0], compiled, max_tokens=3))
    assert events[-1].finish == "length"
    assert re.fullmatch(r"[a-z]+", text_of(tiny, events))  # a prefix: incomplete


async def test_unconstrained_rows_are_token_identical_beside_constrained_ones(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=8)
    free = [request(p, f"free{i}", max_tokens=16, temperature=0.9, seed=i)
            for i, p in enumerate(prompts[:4])]  # fmt: skip
    alone = [await collect(engine, r) for r in free]
    schema = grammar(engine, json_schema=json.dumps(STATUS))
    regex = grammar(engine, regex=r"[0-9]{4}")
    mixed = [
        *[request(p, f"free{i}", max_tokens=16, temperature=0.9, seed=i)
          for i, p in enumerate(prompts[:4])],
        *[constrained(p, schema, temperature=0.9, seed=9) for p in prompts[4:6]],
        *[constrained(p, regex, temperature=0.0) for p in prompts[6:8]],
    ]  # fmt: skip
    together = await asyncio.gather(*(collect(engine, r) for r in mixed))
    for before, after in zip(alone, together[:4], strict=True):
        assert [e.token_id for e in after] == [e.token_id for e in before]
    assert engine.stats().total_steps > 0


async def test_a_resumed_request_continues_the_format(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    compiled = grammar(engine, regex=r"ab[0-9]{6}")
    head = list(tiny.tokenizer("ab", add_special_tokens=False)["input_ids"])
    req = constrained(prompts[0], compiled, temperature=1.0, seed=3)
    req.continuation_ids = head
    events = await collect(engine, req)
    assert re.fullmatch(r"[0-9]{6}", text_of(tiny, events))
    bad = constrained(prompts[0], compiled)
    bad.continuation_ids = list(tiny.tokenizer("zz", add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="continuation_ids"):
        engine.generate(bad)


def test_compiled_grammars_are_cached_and_errors_carry_the_reason(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(start=False)
    source = ResponseFormat("json_schema", json.dumps(STATUS)).grammar()
    assert engine.grammars.compile(source) is engine.grammars.compile(source)
    with pytest.raises(GrammarError, match="unknown name"):
        engine.grammars.compile(ResponseFormat("grammar", 'start: "a" | nope').grammar())


async def test_a_request_waits_for_its_grammar_while_others_run(
    make_engine: EngineFactory,
    tiny: LoadedModel,
    prompts: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = make_engine()
    release = threading.Event()
    compile_now = engine.grammars.compile

    def slow_compile(source: str) -> Any:
        release.wait(timeout=60)  # a grammar that takes long to compile
        return compile_now(source)

    monkeypatch.setattr(engine.grammars, "compile", slow_compile)
    source = ResponseFormat("regex", "[0-9]{5}").grammar()
    waiting = asyncio.ensure_future(engine.grammars.compile_async(source))
    # ignore_eos: six tokens whatever the random weights draw (neither loop nor engine waits)
    free = await collect(engine, request(prompts[2], max_tokens=6, ignore_eos=True))
    assert len(free) == 6 and not waiting.done()
    release.set()
    events = await collect(engine, constrained(prompts[0], await waiting))
    assert re.fullmatch("[0-9]{5}", text_of(tiny, events))
