"""int4 weights read straight from GGUF Q4_0/Q4_1 blocks (engine/gguf_blocks.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from services.inference.engine.gguf_blocks import GgufInt4, _decode, _unpermute
from services.inference.engine.quant import int4_from_blocks
from services.inference.engine.runner import Runner
from tests.doubles.tiny_model import build_tiny_model

KINDS = {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q4_1": gguf.GGMLQuantizationType.Q4_1}


def _raw(weight: torch.Tensor, kind: str) -> np.ndarray:
    return gguf.quants.quantize(weight.float().numpy(), KINDS[kind])


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_blocks_dequantise_as_the_gguf_library_does(kind: str) -> None:
    torch.manual_seed(0)
    raw = _raw(torch.randn(48, 96), kind)
    blocks = _decode(raw, kind, (48, 96))
    want = torch.from_numpy(gguf.quants.dequantize(raw, KINDS[kind]))
    assert blocks.codes.dtype == torch.uint8 and int(blocks.codes.max()) <= 15
    assert torch.equal(blocks.dequantize(), want)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_the_int4_kernel_serves_the_files_weights(kind: str) -> None:
    # Two weights stacked as the runner fuses them (q/k/v, gate/up).
    torch.manual_seed(1)
    parts = [_decode(_raw(torch.randn(n, 64), kind), kind, (n, 64)) for n in (32, 96)]
    weight = int4_from_blocks(parts, torch.float32)
    x = torch.randn(5, 64)
    dense = torch.cat([p.dequantize() for p in parts])
    torch.testing.assert_close(weight.linear(x, None), x @ dense.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
def test_row_order_undoes_llama_cpps_permutation_as_transformers_does(
    heads: int, kv_heads: int
) -> None:
    # transformers undoes a key weight's permutation over kv_heads, a query's over heads.
    rows = torch.arange(kv_heads * 16 * 3).view(kv_heads * 16, 3)
    processor = LlamaTensorProcessor()  # type: ignore[no-untyped-call]
    want = processor._reverse_permute_weights(rows.numpy(), heads, kv_heads)
    assert torch.equal(rows[_unpermute(rows.shape[0], kv_heads)], torch.from_numpy(want))
    assert torch.equal(_permute(rows, kv_heads)[_unpermute(rows.shape[0], kv_heads)], rows)


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert script's query/key row order."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(model: Any, path: Path, kind: str, tamper: str = "") -> None:
    """A GGUF holding the model's projections as `kind` blocks, llama.cpp's way; the
    model's weights become what the file means (as when transformers loads it)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, "llama")
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        weight = module.weight.detach().float()
        n_head = None
        if name.endswith("q_proj"):
            n_head = config.num_attention_heads
        elif name.endswith("k_proj"):
            n_head = config.num_key_value_heads
        stored = _permute(weight, n_head) if n_head else weight
        raw = _raw(stored, kind)
        meant = torch.from_numpy(gguf.quants.dequantize(raw, KINDS[kind]))
        if n_head:
            meant = meant[_unpermute(meant.shape[0], n_head)]
        if name == tamper:
            raw = raw.copy()
            raw[0, -1] ^= 0x11  # one code differs from the loaded weight
        module.weight.data = meant.to(module.weight.dtype)
        writer.add_tensor(f"{names.get_name(name)}.weight", raw, raw_dtype=KINDS[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_runner_keeps_the_files_codes_and_refuses_blocks_that_do_not_match(
    tmp_path: Path, kind: str
) -> None:
    torch.manual_seed(2)
    model = build_tiny_model().model
    tampered = "model.layers.1.mlp.down_proj"
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path, kind, tamper=tampered)
    file = GgufInt4(path, model)
    projections = 7 * model.config.num_hidden_layers
    blocks = {
        name: part
        for name, module in model.named_modules()
        if (part := file.blocks(module)) is not None
    }
    assert tampered not in blocks
    assert len(blocks) == projections - 1
    runner = Runner(model, quantize="int4", gguf=path)
    assert runner.from_file == projections - 1
    # The file's codes, not a fresh quantisation of the loaded weights.
    for name, part in blocks.items():
        assert torch.equal(part.dequantize(), model.get_submodule(name).weight.float())
    requantised = Runner(model, quantize="int4")
    assert requantised.from_file == 0
