"""A worker serving quantised weights: --quantize reaches the engine and Describe."""

from __future__ import annotations

import dataclasses

import pytest
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.inference.v1 import worker_service_pb2 as wpb

from services.common.settings import SettingsError
from services.inference.settings import load_inference_settings
from tests.doubles.tiny_model import build_tiny_model, build_tokenizer
from tests.unit.inference_service.harness import request, scripted_model, serving, stream_all
from tests.unit.inference_service.test_settings_cli import parse

SCRIPT = "The capital of France is Paris."


@pytest.mark.parametrize("mode", ["int8", "int4"])
async def test_quantised_worker_generates_over_grpc_and_describes_it(mode: str) -> None:
    script = scripted_model(build_tokenizer(), SCRIPT)
    loaded = dataclasses.replace(script.loaded, revision="abc123")
    async with serving(loaded, quantize=mode) as w:
        info = await w.worker.Describe(wpb.DescribeRequest())
        req = request(
            token_ids=gen.TokenIds(ids=[script.start_id]),
            sampling=gen.SamplingParams(max_tokens=64, temperature=0.0),
        )
        messages = await stream_all(w.gen, req)
    assert info.quantization == mode
    # Quantised weights answer differently: the response cache keys them apart.
    assert info.model_revision == f"abc123+{mode}"
    assert "".join(m.text for m in messages) == SCRIPT
    assert messages[-1].finish_reason == gen.FINISH_REASON_STOP


async def test_an_unquantised_worker_says_none() -> None:
    loaded = dataclasses.replace(build_tiny_model(), revision="abc123")
    async with serving(loaded) as w:
        info = await w.worker.Describe(wpb.DescribeRequest())
    assert info.quantization == "none"
    assert info.model_revision == "abc123"


def test_quantize_flag_and_variable() -> None:
    assert load_inference_settings({}, parse()).quantize == "none"
    env = {"TOKENYARD_INFERENCE_QUANTIZE": "int8"}
    assert load_inference_settings(env, parse()).quantize == "int8"
    assert load_inference_settings(env, parse("--quantize", "int4")).quantize == "int4"
    with pytest.raises(SettingsError, match="--quantize"):
        load_inference_settings({}, parse("--quantize", "int3"))
