"""The AMX kernels for quantised layers (engine/amx.py, csrc/amx_woq.cpp).

They run only on CPUs with AMX; elsewhere the kernel tests are skipped and quant.py
keeps to PyTorch's kernels (the flag parsing and the fallback are tested anyway).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.inference.engine import amx
from services.inference.engine.quant import AMX_ROWS, _unpack_int4, quantize_int4, quantize_int8
from services.inference.engine.runner import Runner
from tests.doubles.tiny_model import build_tiny_model
from tests.unit.inference.helpers import prefill_then_decode, threads_after

# On a CPU with AMX the kernels must build and run: a failed build fails here.
needs_amx = pytest.mark.skipif(not amx.cpu_has_amx(), reason="this CPU has no AMX")
BF16 = torch.bfloat16


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_the_cpu_needs_every_flag_the_kernels_are_built_for() -> None:
    flags = "fpu avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_tile amx_bf16 amx_int8"
    assert amx.cpu_has_amx(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert not amx.cpu_has_amx(f"flags\t\t: {flags.replace('amx_bf16', '')}\n")
    assert not amx.cpu_has_amx("processor\t: 0\n")


@needs_amx
def test_the_kernels_build_and_run_on_this_cpu() -> None:
    assert amx.available()


SHAPES = [(64, 32), (960, 576), (128, 1536)]


@needs_amx
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 40])
def test_int8_matches_pytorchs_kernel(out_features: int, in_features: int, rows: int) -> None:
    torch.manual_seed(rows)
    q = quantize_int8((torch.randn(out_features, in_features) * 0.05).to(BF16))
    x = torch.randn(rows, in_features, dtype=BF16)
    want = torch.ops.aten._weight_int8pack_mm(x, q.codes, q.scales)
    got = amx.int8_linear(x, q.codes, q.scales)
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    assert relative_error(got, want) < 5e-3  # both round the same sums to bf16


@needs_amx
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", [1, 8, 16, 17, 40])
def test_int4_reads_pytorchs_packed_layout(out_features: int, in_features: int, rows: int) -> None:
    torch.manual_seed(rows)
    q = quantize_int4((torch.randn(out_features, in_features) * 0.05).to(BF16))
    x = torch.randn(rows, in_features, dtype=BF16)
    got = amx.int4pack_linear(x, q.packed, q.scales_zeros)
    # The kernel multiplies by the weight rounded to bf16 once, summing in float32.
    codes = _unpack_int4(q.packed).float().view(out_features, -1, 32)
    scales, zeros = q.scales_zeros.float().transpose(0, 1).unbind(-1)
    weight = ((codes - 8) * scales[..., None] + zeros[..., None]).view(out_features, -1)
    exact = F.linear(x.float(), weight.to(BF16).float())
    assert relative_error(got, exact) < 5e-3
    by_pytorch = torch.ops.aten._weight_int4pack_mm_for_cpu(x, q.packed, 32, q.scales_zeros)
    assert relative_error(got, by_pytorch) < 1e-2


@needs_amx
def test_bad_input_is_refused_with_what_is_wrong() -> None:
    q = quantize_int8(torch.randn(64, 64).to(BF16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        amx.int8_linear(torch.randn(2, 64), q.codes, q.scales)
    with pytest.raises(RuntimeError, match="32 columns, the weight 64"):
        amx.int8_linear(torch.randn(2, 32, dtype=BF16), q.codes, q.scales)
    q4 = quantize_int4(torch.randn(96, 64).to(BF16))  # not whole 64-channel blocks
    with pytest.raises(RuntimeError, match="out_features of 64"):
        amx.int4pack_linear(torch.randn(2, 64, dtype=BF16), q4.packed, q4.scales_zeros)


@needs_amx
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_bf16_decode_batch_through_amx_gives_pytorchs_logits(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = build_tiny_model(dtype=BF16)
    runner = Runner(loaded.model, quantize=mode)
    rows, length = 2 * AMX_ROWS, 24
    ids = torch.randint(
        0, runner.vocab_size, (rows, length), generator=torch.Generator().manual_seed(6)
    )

    def decode_logits() -> torch.Tensor:
        return prefill_then_decode(runner, ids, capacity=32)[1]

    with_amx = decode_logits()
    monkeypatch.setattr(amx, "available", lambda: False)
    without = decode_logits()
    assert relative_error(with_amx, without) < 0.02
    assert (with_amx.argmax(-1) == without.argmax(-1)).float().mean() >= 0.9


@needs_amx
def test_an_amx_call_leaves_the_compute_threads_count_alone() -> None:
    # The kernels once reset the caller to the default on first use (at::parallel_for).
    q = quantize_int8(torch.randn(64, 64).to(BF16))
    q4 = quantize_int4(torch.randn(64, 64).to(BF16))
    x = torch.randn(2 * AMX_ROWS, 64, dtype=BF16)

    def kernels() -> None:
        amx.int8_linear(x, q.codes, q.scales)
        amx.int4pack_linear(x, q4.packed, q4.scales_zeros)

    assert threads_after(kernels) == 2
