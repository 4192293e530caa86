"""A worker serves a model without a fast path (tiny random GPT-2) over real gRPC."""

from __future__ import annotations

import asyncio
import logging

import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.inference.v1 import worker_service_pb2 as wpb

from tests.doubles.tiny_model import build_tokenizer
from tests.unit.inference.families import build_family
from tests.unit.inference.helpers import hf_greedy
from tests.unit.inference_service.harness import as_generate, request, serving, stream_all

pytestmark = pytest.mark.timeout(120)
MODEL = "tiny-gpt2"


async def test_a_gpt2_worker_streams_transformers_greedy_output(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tokenyard.inference")
    tokenizer = build_tokenizer()
    gpt2 = build_family("gpt2", tokenizer, seed=3)
    prompts = ["The quick brown fox", "What is the capital of France?", "0123456789"]
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    expected = [hf_greedy(gpt2, p, 24) for p in ids]
    assert len({tuple(e) for e in expected}) == len(expected)
    async with serving(gpt2) as w:
        info = await w.worker.Describe(wpb.DescribeRequest())
        assert info.execution_path == wpb.EXECUTION_PATH_GENERIC
        assert info.model == MODEL and info.prefix_cache is False
        sampling = gen.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        streams = await asyncio.gather(
            *(
                stream_all(
                    w.gen,
                    request(model=MODEL, token_ids=gen.TokenIds(ids=p), sampling=sampling),
                )
                for p in ids
            )
        )
        unary = await w.gen.Generate(
            as_generate(request(model=MODEL, prompt=prompts[0], sampling=sampling))
        )
    assert "model tiny-gpt2: generic path" in caplog.text
    for messages, want in zip(streams, expected, strict=True):
        assert len(messages) > 1  # streamed, not delivered at the end
        assert [t for m in messages for t in m.token_ids] == want
        assert "".join(m.text for m in messages) == tokenizer.decode(want)
        assert messages[-1].finish_reason == gen.FINISH_REASON_LENGTH
        assert messages[-1].usage.completion_tokens == 24
    assert list(unary.token_ids) == expected[0]


async def test_a_gpt2_worker_stops_a_cancelled_stream() -> None:
    gpt2 = build_family("gpt2", build_tokenizer(), seed=3)
    async with serving(gpt2) as w:
        sampling = gen.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        call = w.gen.StreamGenerate(request(model=MODEL, prompt="Hello", sampling=sampling))
        first = await call.read()
        assert first.token_ids
        call.cancel()
        report = await w.watch_until(lambda r: r.running == 0 and r.queued == 0)
        assert report.free_slots == 4
        assert w.app.engine.stats().total_cancelled == 1
