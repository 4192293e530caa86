"""Weight-only int8/int4 quantisation of the fast path (engine/quant.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.inference.engine import amx, avx2
from services.inference.engine.generic import select_runner
from services.inference.engine.quant import (
    INT4_DEQUANT_ROWS,
    INT8_DEQUANT_ROWS,
    Int4Weight,
    Int8Weight,
    QuantizationError,
    check_quantizable,
    quantize,
    quantize_int4,
    quantize_int8,
)
from services.inference.engine.runner import Runner
from services.inference.model_loading import LoadedModel
from tests.doubles.tiny_model import build_tiny_model
from tests.unit.inference.families import build_family

# Relative error of a product with a random weight: int8 per channel keeps ~0.5 %,
# int4 in groups of 32 ~7 %; the bounds leave room for bf16 activations.
TOLERANCE = {"int8": 0.02, "int4": 0.15}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 13])
def test_quantised_linear_matches_the_dtype_one(mode: str, dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(0)
    weight = (torch.randn(96, 128) * 0.05).to(dtype)
    bias = torch.randn(96).to(dtype)
    x = torch.randn(rows, 128).to(dtype)
    want = F.linear(x.float(), weight.float(), bias.float())
    got = quantize(weight, mode).linear(x, bias)
    assert got.shape == (rows, 96)
    assert got.dtype == dtype
    assert relative_error(got, want) < TOLERANCE[mode]


def test_int8_is_the_codes_times_the_scales() -> None:
    torch.manual_seed(1)
    q = quantize_int8(torch.randn(64, 96))
    x = torch.randn(9, 96)
    dequantised = q.codes.float() * q.scales[:, None]
    torch.testing.assert_close(q.linear(x, None), x @ dequantised.T, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([3, 0, 63])
    torch.testing.assert_close(q.rows(rows), dequantised[rows])


def test_the_int4_weight_dequantised_is_the_one_the_kernel_multiplies_by() -> None:
    # The kernel itself, fed the identity, writes out the weight it uses: our reading
    # of its packed layout and formula must give the same numbers.
    torch.manual_seed(2)
    q = quantize_int4(torch.randn(192, 96))
    assert q.unpackable
    by_kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.eye(96), q.packed, q.group, q.scales_zeros
    ).T
    torch.testing.assert_close(q.dequantized(), by_kernel, rtol=1e-6, atol=1e-6)


def test_an_int4_layout_we_cannot_read_keeps_to_the_kernel() -> None:
    # 80 output channels: not whole blocks of the kernel's layout (64 or 32).
    torch.manual_seed(3)
    weight = torch.randn(80, 64)
    q = quantize_int4(weight)
    assert not q.unpackable
    x = torch.randn(INT4_DEQUANT_ROWS, 64)
    want = F.linear(x, weight)
    assert relative_error(q.linear(x, None), want) < TOLERANCE["int4"]


@pytest.mark.parametrize(
    ("mode", "rows"), [("int8", INT8_DEQUANT_ROWS), ("int4", INT4_DEQUANT_ROWS)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_go_through_the_dequantised_weight_with_the_kernels_result(
    mode: str, rows: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(amx, "available", lambda: False)  # a CPU without AMX
    monkeypatch.setattr(avx2, "available", lambda: False)  # nor the float32 kernels
    torch.manual_seed(4)
    q = quantize((torch.randn(128, 96) * 0.05).to(dtype), mode)
    x = torch.randn(rows, 96).to(dtype)
    bias = torch.randn(128).to(dtype)
    many = q.linear(x, bias)
    by_kernel = torch.cat([q.linear(x[i : i + 4], bias) for i in range(0, rows, 4)])
    assert many.dtype == dtype
    if dtype is torch.float32:
        torch.testing.assert_close(many, by_kernel, rtol=1e-4, atol=1e-4)
    else:  # the dequantised weight is rounded to bf16 once more than the kernel's
        assert relative_error(many, by_kernel) < 0.01


def test_int4_refuses_a_layer_that_does_not_split_into_groups() -> None:
    with pytest.raises(QuantizationError, match="groups of 32"):
        quantize(torch.randn(32, 80), "int4")


@pytest.mark.parametrize(
    ("mode", "device", "dtype", "message"),
    [
        ("int3", "cpu", torch.float32, "expected one of none, int8, int4"),
        ("int8", "cuda", torch.bfloat16, "CPU only"),
        ("int4", "cpu", torch.float16, "bfloat16 or float32"),
    ],
)
def test_unsupported_combinations_are_refused(
    mode: str, device: str, dtype: torch.dtype, message: str
) -> None:
    with pytest.raises(QuantizationError, match=message):
        check_quantizable(mode, torch.device(device), dtype)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_runner_quantises_every_projection_and_the_head(tiny: LoadedModel, mode: str) -> None:
    full = Runner(tiny.model)
    runner = Runner(tiny.model, quantize=mode)
    assert runner.quantization == mode
    assert runner.weight_bytes() < 0.5 * full.weight_bytes()
    ids = torch.tensor(tiny.tokenizer("The quick brown fox")["input_ids"])
    want = full.prefill(full.new_cache(1, 64), [(0, ids, 0)])
    got = runner.prefill(runner.new_cache(1, 64), [(0, ids, 0)])
    assert relative_error(got, want) < TOLERANCE[mode]
    # The model keeps its own weights unless the runner takes them.
    assert tiny.model.lm_head.weight.numel() > 0


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_long_prompt_in_one_chunk_gives_what_short_chunks_give(
    tiny: LoadedModel, mode: str
) -> None:
    # One chunk past the dequantising threshold against chunks the kernels compute.
    runner = Runner(tiny.model, quantize=mode)
    kind = Int4Weight if mode == "int4" else Int8Weight
    for layer in runner.layers:
        assert isinstance(layer.w_gate_up, kind)
        # Every int4 layer of the tiny model is whole blocks of the kernel's layout.
        assert not isinstance(layer.w_gate_up, Int4Weight) or layer.w_gate_up.unpackable
    n = max(INT8_DEQUANT_ROWS, INT4_DEQUANT_ROWS) + 7
    ids = torch.randint(0, runner.vocab_size, (n,), generator=torch.Generator().manual_seed(5))
    whole = runner.prefill(runner.new_cache(1, 256), [(0, ids, 0)])
    cache = runner.new_cache(1, 256)
    for start in range(0, n, 32):
        pieces = runner.prefill(cache, [(0, ids[start : start + 32], start)])
    torch.testing.assert_close(whole, pieces, rtol=1e-4, atol=1e-4)


def test_a_model_on_the_generic_path_is_refused_not_served_unquantised(
    tiny: LoadedModel,
) -> None:
    gpt2 = build_family("gpt2", tiny.tokenizer)
    with pytest.raises(QuantizationError, match="generic path"):
        select_runner(gpt2.model, quantize="int8")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_taking_the_weights_frees_every_copy_and_changes_nothing(
    tiny: LoadedModel, mode: str
) -> None:
    own = build_tiny_model(seed=0)  # the same weights as `tiny`, for this runner alone
    kept = Runner(tiny.model, quantize=mode)
    taken = Runner(own.model, quantize=mode, take_weights=True)
    assert taken.released_bytes == sum(
        p.numel() * p.element_size() for p in tiny.model.parameters() if p.dim() == 2
    )
    assert own.model.model.embed_tokens.weight.numel() == 0
    ids = torch.tensor(tiny.tokenizer("Once upon a time")["input_ids"])
    torch.testing.assert_close(
        taken.prefill(taken.new_cache(1, 32), [(0, ids, 0)]),
        kept.prefill(kept.new_cache(1, 32), [(0, ids, 0)]),
        rtol=0,
        atol=0,
    )
