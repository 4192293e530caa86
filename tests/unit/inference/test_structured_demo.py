"""Structured output on the real demo model (SmolLM2-135M-Instruct): slow, marked.

Every schema of `tests.doubles.schemas` (nested objects, arrays, enums, bounded
numbers, optional fields, string patterns...) runs in one batch with a regex
request and a free-text one: every output parses and validates.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from services.common.grammars import ResponseFormat
from services.inference.engine import Engine, EngineRequest, Sampling, TokenEvent
from services.inference.model_loading import load_model
from tests.doubles.schemas import SCHEMAS
from tests.unit.inference.helpers import collect
from tests.unit.inference.test_demo_model import _cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PHONE = r"\+1-[0-9]{3}-[0-9]{3}-[0-9]{4}"


async def test_every_schema_output_validates_in_one_batch(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    loaded = load_model("smollm2-135m", device="cpu", cache_dir=_cache_dir(tmp_path_factory))
    tok = loaded.tokenizer

    def chat(question: str) -> list[int]:
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return list(tok(text, add_special_tokens=False)["input_ids"])

    engine = Engine(loaded, max_running=len(SCHEMAS) + 2, max_queued=0, max_batch_tokens=4096)
    engine.start()
    try:
        compiled = await asyncio.gather(
            *(
                engine.grammars.compile_async(
                    ResponseFormat("json_schema", json.dumps(s)).grammar()
                )
                for s in SCHEMAS.values()
            )
        )
        phone = await engine.grammars.compile_async(ResponseFormat("regex", PHONE).grammar())
        greedy = Sampling(max_tokens=64, temperature=0.0)
        requests = [
            EngineRequest(name, chat(f"An example {name.replace('_', ' ')} as JSON."), greedy,
                          grammar=grammar)
            for name, grammar in zip(SCHEMAS, compiled, strict=True)
        ]  # fmt: skip
        requests.append(EngineRequest("phone", chat("A US phone number?"), greedy, grammar=phone))
        requests.append(EngineRequest("free", chat("Say hi."), Sampling(max_tokens=8)))
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
    finally:
        await engine.stop()

    def text(events: list[TokenEvent]) -> str:
        return str(tok.decode([e.token_id for e in events], skip_special_tokens=True))

    for (name, schema), events in zip(SCHEMAS.items(), results, strict=False):
        assert events[-1].finish == "stop", (name, text(events))
        jsonschema.validate(json.loads(text(events)), schema)
    assert re.fullmatch(PHONE, text(results[-2]))
    assert results[-2][-1].finish == "stop"
    assert len(results[-1]) <= 8
