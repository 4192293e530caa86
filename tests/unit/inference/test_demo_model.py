"""End to end on the real demo model (SmolLM2-135M-Instruct): slow, marked."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from services.inference.engine import Engine
from services.inference.engine.detokenizer import IncrementalDetokenizer
from services.inference.model_loading import demo_gguf_path, load_model
from services.inference.model_sources import content_digest
from tests.unit.inference.helpers import collect, request

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _entry_name() -> str:
    gguf = demo_gguf_path()
    return f"{gguf.stem}-{content_digest(gguf)}"


def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Reuse the user's converted copy when present (2 s) instead of converting (25 s).
    shared = Path(os.path.expanduser("~/.cache/tokenyard/models"))
    if (shared / _entry_name() / "config.json").is_file():
        return shared
    return tmp_path_factory.mktemp("models")


@pytest.mark.parametrize("quantize", ["none", "int4"])
async def test_demo_model_knows_the_capital_of_germany(
    tmp_path_factory: pytest.TempPathFactory, quantize: str
) -> None:
    loaded = load_model("smollm2-135m", device="cpu", cache_dir=_cache_dir(tmp_path_factory))
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(
        # Not France: there the first token is a near tie in the demo model ("The"
        # 25.625 against "L" 25.5 through int4's weight-only kernels, one bf16 step),
        # which int4 with quantised activations (avx512.py's VNNI kernels) tips to
        # "L'Étoile, ...". Germany's answer is the same through every kernel.
        [{"role": "user", "content": "What is the capital of Germany?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    engine = Engine(loaded, max_running=4, max_queued=4, max_batch_tokens=256, quantize=quantize)
    if quantize == "int4":  # every projection keeps the GGUF's own Q4_1 codes
        assert engine.runner.from_file == 7 * loaded.model.config.num_hidden_layers
    engine.warmup()
    engine.start()
    try:
        events = await collect(engine, request(ids, temperature=0.0, max_tokens=32))
    finally:
        await engine.stop()
    detok = IncrementalDetokenizer(tok, ids)
    text = detok.feed(e.token_id for e in events) + detok.flush()
    assert "Berlin" in text
    assert events[-1].finish == "stop"


def test_demo_alias_converts_once_into_the_cache(tmp_path: Path) -> None:
    # The GGUF is dequantized and saved as safetensors once; later loads use the copy.
    first = load_model("smollm2-135m", device="cpu", dtype="float32", cache_dir=tmp_path)
    name = _entry_name()
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == [f".{name}.lock", name]  # no temporary folder left behind
    folder = tmp_path / name
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert first.context_length == 8192 and first.eos_token_ids
    started = time.monotonic()
    again = load_model("smollm2-135m", device="cpu", dtype="float32", cache_dir=tmp_path)
    assert time.monotonic() - started < 15
    ids = torch.tensor([[1, 504, 3458, 282]])
    with torch.no_grad():
        assert torch.allclose(first.model(ids).logits, again.model(ids).logits)
