"""The AVX2 kernels for quantised layers in float32 (engine/avx2.py, csrc/avx2_woq.cpp).

They run on CPUs with AVX2 and FMA; elsewhere the kernel tests are skipped and
quant.py keeps to PyTorch's kernels (the flag parsing is tested anyway).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.inference.engine import amx, avx2, quant
from services.inference.engine.cpu_kernels import build_all
from services.inference.engine.quant import (
    AVX2_INT4_ROWS,
    AVX2_INT8_ROWS,
    int4_block_n,
    quantize_int4,
    quantize_int8,
)
from services.inference.engine.runner import Runner
from tests.doubles.tiny_model import build_tiny_model
from tests.unit.inference.helpers import (
    attention_case,
    pack_int4,
    prefill_then_decode,
    ragged_decode_step,
    sdpa_over_lengths,
    spy,
    threads_after,
)

# On a CPU with AVX2 the kernels must build and run: a failed build fails here.
needs_avx2 = pytest.mark.skipif(not avx2.EXTENSION.runs_on(), reason="this CPU has no AVX2")
SHAPES = [(64, 32), (960, 576), (128, 1536)]
ROWS = [1, 2, 5, 17, 40]


def test_the_cpu_needs_avx2_and_fma() -> None:
    assert avx2.EXTENSION.runs_on("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma f16c\n")
    assert not avx2.EXTENSION.runs_on("flags\t\t: fpu sse avx avx2 f16c\n")
    assert not avx2.EXTENSION.runs_on("processor\t: 0\n")


@needs_avx2
def test_the_kernels_build_and_run_on_this_cpu() -> None:
    assert avx2.available()
    built = build_all()  # what `make setup` and the worker image run
    assert built[avx2.EXTENSION.name] == "runs here"
    assert (built[amx.EXTENSION.name] == "runs here") == amx.available()


@needs_avx2
def test_the_layout_pytorch_packs_here_is_one_the_kernels_read() -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (128, 96), dtype=torch.int32)
    block = int4_block_n()
    assert block in (32, 64)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    assert torch.equal(packed, pack_int4(codes, block))


@needs_avx2
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int8_multiplies_by_the_dequantised_weight(
    out_features: int, in_features: int, rows: int
) -> None:
    torch.manual_seed(rows)
    q = quantize_int8(torch.randn(out_features, in_features) * 0.05)
    x = torch.randn(rows, in_features)
    got = avx2.int8_linear(x, q.codes, q.scales)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    torch.testing.assert_close(got, F.linear(x, q.dequantized()), rtol=1e-5, atol=1e-5)


@needs_avx2
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int4_reads_either_packed_layout(
    block: int, out_features: int, in_features: int, rows: int
) -> None:
    torch.manual_seed(rows)
    codes = torch.randint(0, 16, (out_features, in_features))
    groups = (out_features, in_features // 32)
    scales, zeros = torch.rand(groups) * 0.01, torch.randn(groups) * 0.01
    scales_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
    weight = ((codes.float().view(*groups, 32) - 8) * scales[..., None] + zeros[..., None]).view(
        out_features, in_features
    )
    x = torch.randn(rows, in_features)
    got = avx2.int4pack_linear(x, pack_int4(codes, block), scales_zeros, block)
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-4, atol=1e-5)


@needs_avx2
def test_bad_input_is_refused_with_what_is_wrong() -> None:
    q = quantize_int8(torch.randn(64, 64))
    with pytest.raises(RuntimeError, match="float32"):
        avx2.int8_linear(torch.randn(2, 64, dtype=torch.bfloat16), q.codes, q.scales)
    with pytest.raises(RuntimeError, match="32 columns, the weight 64"):
        avx2.int8_linear(torch.randn(2, 32), q.codes, q.scales)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        avx2.int8_linear(torch.randn(2, 64), q.codes, q.scales[:8])
    q4 = quantize_int4(torch.randn(96, 64))
    with pytest.raises(RuntimeError, match="block_n must be 32 or 64, not 16"):
        avx2.int4pack_linear(torch.randn(2, 64), q4.packed, q4.scales_zeros, 16)
    with pytest.raises(RuntimeError, match="out_features of 64"):
        avx2.int4pack_linear(torch.randn(2, 64), q4.packed, q4.scales_zeros, 64)
    with pytest.raises(RuntimeError, match=r"scales_zeros must be contiguous float32"):
        avx2.int4pack_linear(torch.randn(2, 64), q4.packed, q4.scales_zeros[:1], 32)


@needs_avx2
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 16])
def test_a_float32_decode_batch_through_the_kernels_gives_pytorchs_logits(
    mode: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = build_tiny_model(dtype=torch.float32)
    runner = Runner(loaded.model, quantize=mode)
    length = 24
    ids = torch.randint(
        0, runner.vocab_size, (rows, length), generator=torch.Generator().manual_seed(6)
    )
    calls: list[str] = []
    for name in ("int8_linear", "int4pack_linear"):
        monkeypatch.setattr(avx2, name, spy(getattr(avx2, name), calls, lambda *_, _n=name: _n))

    def decode_logits() -> torch.Tensor:
        return prefill_then_decode(runner, ids, capacity=32)[1]

    ours = decode_logits()
    assert {"int8_linear"} <= set(calls)  # the output head is int8 in both modes
    assert mode == "int8" or "int4pack_linear" in calls
    monkeypatch.setattr(avx2, "available", lambda: False)
    runner._attention = None  # decided when the runner was built
    calls.clear()
    pytorchs = decode_logits()
    assert not calls
    torch.testing.assert_close(ours, pytorchs, rtol=1e-3, atol=1e-3)
    assert torch.equal(ours.argmax(-1), pytorchs.argmax(-1))


@needs_avx2
@pytest.mark.parametrize(("mode", "limit"), [("int8", AVX2_INT8_ROWS), ("int4", AVX2_INT4_ROWS)])
def test_from_the_limit_on_rows_go_through_the_dequantised_weight(
    mode: str, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(5)
    q = quant.quantize(torch.randn(128, 96) * 0.05, mode)
    calls: list[int] = []
    name = "int8_linear" if mode == "int8" else "int4pack_linear"
    monkeypatch.setattr(avx2, name, spy(getattr(avx2, name), calls, lambda x, *_: x.shape[0]))
    below, at = torch.randn(limit - 1, 96), torch.randn(limit, 96)
    torch.testing.assert_close(q.linear(below, None), F.linear(below, q.dequantized()))
    torch.testing.assert_close(q.linear(at, None), F.linear(at, q.dequantized()))
    assert calls == [limit - 1]


@needs_avx2
def test_a_kernel_call_leaves_the_compute_threads_count_alone() -> None:
    q = quantize_int8(torch.randn(64, 64))
    q4 = quantize_int4(torch.randn(64, 64))
    x = torch.randn(4, 64)

    def kernels() -> None:
        avx2.int8_linear(x, q.codes, q.scales)
        avx2.int4pack_linear(x, q4.packed, q4.scales_zeros, int4_block_n() or 64)

    assert threads_after(kernels) == 2


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "kv_heads", "group"), [(1, 3, 3), (3, 2, 1), (17, 1, 4)])
def test_decode_attention_is_sdpa_over_each_rows_positions(
    dtype: torch.dtype, rows: int, kv_heads: int, group: int
) -> None:
    hd = 64
    q, k, v, lengths = attention_case(rows, kv_heads, group, hd, 48, dtype)
    got = avx2.decode_attention(q, k, v, lengths, 0.125)
    want = sdpa_over_lengths(q, k, v, lengths, 0.125)
    assert got.dtype == dtype and got.shape == (rows, kv_heads * group * hd)
    tolerance = 1e-5 if dtype is torch.float32 else 8e-3  # bf16: the result rounded once
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)


@needs_avx2
def test_decode_attention_refuses_what_it_cannot_read() -> None:
    k = v = torch.zeros(2, 1, 8, 64)
    q = torch.zeros(2, 1, 2, 64)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 9 is outside 1..8"):
        avx2.decode_attention(q, k, v, torch.tensor([3, 9]), 1.0)
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 0 is outside"):
        avx2.decode_attention(q, k, v, torch.tensor([0, 1]), 1.0)
    with pytest.raises(RuntimeError, match="of q's dtype"):
        avx2.decode_attention(q, k.bfloat16(), v.bfloat16(), torch.tensor([1, 1]), 1.0)
    with pytest.raises(RuntimeError, match="a slot per row"):
        avx2.decode_attention(torch.zeros(3, 1, 2, 64), k, v, torch.tensor([1, 1, 1]), 1.0)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        avx2.decode_attention(
            torch.zeros(2, 1, 2, 12),
            torch.zeros(2, 1, 8, 12),
            torch.zeros(2, 1, 8, 12),
            torch.tensor([1, 1]),
            1.0,
        )


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_through_the_attention_kernel_gives_sdpas_logits(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = build_tiny_model(dtype=dtype)
    runner = Runner(loaded.model)
    assert runner._attention is not None
    runner._attention = avx2  # bf16 on AVX-512 CPUs takes avx512's: this tests AVX2's
    calls: list[int] = []
    monkeypatch.setattr(
        avx2, "decode_attention", spy(avx2.decode_attention, calls, lambda q, *_: q.shape[0])
    )
    ours = ragged_decode_step(runner, rows=5)
    assert calls and set(calls) == {5}
    runner._attention = None
    calls.clear()
    sdpa = ragged_decode_step(runner, rows=5)
    assert not calls
    tolerance = 1e-4 if dtype is torch.float32 else 0.05
    torch.testing.assert_close(ours.float(), sdpa.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(ours.argmax(-1), sdpa.argmax(-1))


@needs_avx2
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 32), (960, 576), (200, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_dense_linear_is_f_linear(out_features: int, in_features: int, rows: int) -> None:
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(rows, in_features)
    got = avx2.dense_linear(x, weight)
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="1 to 4 rows, not 5"):
        avx2.dense_linear(torch.randn(5, in_features), weight)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        avx2.dense_linear(torch.randn(rows, 24), torch.randn(8, 24))


@needs_avx2
def test_a_float32_model_decodes_through_dense_linear_with_mkls_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded = build_tiny_model(dtype=torch.float32)
    runner = Runner(loaded.model)
    calls: list[int] = []
    monkeypatch.setattr(
        avx2, "dense_linear", spy(avx2.dense_linear, calls, lambda x, *_: x.shape[0])
    )
    ids = torch.randint(0, runner.vocab_size, (24,), generator=torch.Generator().manual_seed(2))

    def greedy() -> tuple[list[int], torch.Tensor]:
        cache = runner.new_cache(1, 64)
        logits = runner.prefill(cache, [(0, ids, 0)])
        first, tokens = logits, []
        for position in range(24, 40):
            token = logits.argmax(-1)
            tokens.append(int(token))
            pos = torch.tensor([position])
            mask = torch.ones((1, 1, 1, position + 1), dtype=torch.bool)
            logits = runner.decode(cache, token, pos, runner.write_rows(cache, pos), mask)
        return tokens, first

    ours, ours_first = greedy()
    assert calls and set(calls) == {1}  # every decode row; the prompt's 24 rows are MKL's
    monkeypatch.setattr(avx2, "available", lambda: False)
    runner._attention = None
    calls.clear()
    mkl, mkl_first = greedy()
    assert not calls
    assert ours == mkl
    torch.testing.assert_close(ours_first, mkl_first, rtol=1e-4, atol=1e-4)
