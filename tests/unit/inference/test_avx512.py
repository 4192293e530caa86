"""The AVX-512 BF16 kernels for bf16 layers on CPUs without AMX (engine/avx512.py,
csrc/avx512_woq.cpp).

They run on CPUs with AVX-512 BF16, VBMI and VNNI; elsewhere the kernel tests are skipped
and the engine keeps oneDNN's packed bf16 and PyTorch's weight-only kernels (the flag
parsing is tested anyway).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.inference.engine import avx512, quant
from services.inference.engine.cpu_kernels import build_all
from services.inference.engine.kv_cache import DecodeBatch, KVCache
from services.inference.engine.quant import quantize_int4, quantize_int8
from services.inference.engine.runner import Runner, packs_weights
from tests.doubles.tiny_model import build_tiny_model
from tests.unit.inference.families import build_family
from tests.unit.inference.helpers import (
    attention_case,
    pack_int4,
    prefill_then_decode,
    ragged_decode_step,
    relative_error,
    sdpa_over_lengths,
    spy,
    threads_after,
)

BF16 = torch.bfloat16
# On a CPU with AVX-512 BF16 the kernels must build and run: a failed build fails here.
needs_avx512 = pytest.mark.skipif(
    not avx512.EXTENSION.runs_on(), reason="this CPU has no AVX-512 BF16, VBMI and VNNI"
)
# The engine takes them only where they serve (no AMX); the kernels run regardless.
needs_serving = pytest.mark.skipif(
    not avx512.EXTENSION.runs_on() or not avx512.serves(),
    reason="the engine does not take the AVX-512 kernels on this CPU",
)
SHAPES = [(32, 32), (960, 576), (128, 1536)]
# One row, the register-only rows (up to 4), the pair buffer's (5 on) with remainders.
ROWS = [1, 2, 3, 4, 5, 8, 9, 17, 40]
# A bf16 result is rounded once: its error against float32 sums is about 2^-9.
TOLERANCE = 4e-3

AVX512_FLAGS = "avx512f avx512bw avx512vl avx512dq avx512_bf16 avx512vbmi avx512_vnni"


def float_weight(q: quant.Int8Weight | quant.Int4Weight) -> torch.Tensor:
    """The weight `q` stands for, in float32 (`dequantized` rounds to bf16 twice)."""
    if isinstance(q, quant.Int8Weight):
        return q.codes.float() * q.scales.float()[:, None]
    codes = quant._unpack_int4(q.packed).float()
    n, k = codes.shape
    scales, zeros = q.scales_zeros.float().transpose(0, 1).unbind(-1)
    weight = (codes.view(n, k // 32, 32) - 8) * scales[..., None] + zeros[..., None]
    return weight.view(n, k)


def test_the_cpu_needs_avx512_bf16_vbmi_and_vnni() -> None:
    assert avx512.EXTENSION.runs_on(f"processor\t: 0\nflags\t\t: fpu avx2 {AVX512_FLAGS}\n")
    no_vbmi = AVX512_FLAGS.replace(" avx512vbmi", "")
    assert not avx512.EXTENSION.runs_on(f"flags\t\t: fpu avx2 {no_vbmi}\n")  # Cooper Lake
    no_vnni = AVX512_FLAGS.replace(" avx512_vnni", "")
    assert not avx512.EXTENSION.runs_on(f"flags\t\t: fpu avx2 {no_vnni}\n")
    assert not avx512.EXTENSION.runs_on("flags\t\t: fpu sse avx avx2 fma\n")


@needs_avx512
def test_the_kernels_build_and_run_on_this_cpu() -> None:
    assert avx512.available()
    assert build_all()[avx512.EXTENSION.name] == "runs here"


@needs_avx512
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int8_multiplies_by_the_dequantised_weight(
    out_features: int, in_features: int, rows: int
) -> None:
    torch.manual_seed(rows)
    q = quantize_int8((torch.randn(out_features, in_features) * 0.05).to(BF16))
    x = torch.randn(rows, in_features, dtype=BF16)
    got = avx512.int8_linear(x, q.codes, q.scales)
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    assert relative_error(got, F.linear(x.float(), float_weight(q))) < TOLERANCE


@needs_avx512
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 32), (960, 576), (128, 1536)])
@pytest.mark.parametrize("rows", ROWS)
def test_int4_reads_pytorchs_avx512_layout(out_features: int, in_features: int, rows: int) -> None:
    torch.manual_seed(rows)
    codes = torch.randint(0, 16, (out_features, in_features))
    groups = (out_features, in_features // 32)
    scales = (torch.rand(groups) * 0.01).to(BF16)
    zeros = (torch.randn(groups) * 0.01).to(BF16)
    scales_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
    weight = (codes.float().view(*groups, 32) - 8) * scales.float()[..., None]
    weight = (weight + zeros.float()[..., None]).view(out_features, in_features)
    x = torch.randn(rows, in_features, dtype=BF16)
    got = avx512.int4pack_linear(x, pack_int4(codes, 64), scales_zeros)
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    assert relative_error(got, F.linear(x.float(), weight)) < TOLERANCE


@needs_avx512
def test_no_rows_give_an_empty_result() -> None:
    weight = torch.randn(32, 32, dtype=BF16)
    q, q4 = quantize_int8(weight), quantize_int4(torch.randn(64, 32, dtype=BF16))
    empty = torch.zeros(0, 32, dtype=BF16)
    assert avx512.pack(weight).linear(empty, None).shape == (0, 32)
    assert avx512.int8_linear(empty, q.codes, q.scales).shape == (0, 32)
    assert avx512.int4pack_linear(empty, q4.packed, q4.scales_zeros).shape == (0, 64)


@needs_avx512
def test_bad_input_is_refused_with_what_is_wrong() -> None:
    weight = torch.randn(64, 64, dtype=BF16)
    q = quantize_int8(weight)
    x = torch.randn(2, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        avx512.int8_linear(x.float(), q.codes, q.scales)
    with pytest.raises(RuntimeError, match="32 columns, the weight 64"):
        avx512.int8_linear(x[:, :32], q.codes, q.scales)
    with pytest.raises(RuntimeError, match="scales must be bfloat16"):
        avx512.int8_linear(x, q.codes, q.scales.float())
    with pytest.raises(RuntimeError, match="out_features of 32"):
        avx512.pack(weight[:48])
    with pytest.raises(RuntimeError, match="weight must be a contiguous 2-D bfloat16"):
        avx512.pack(weight.float())
    q4 = quantize_int4(torch.randn(96, 64, dtype=BF16))
    with pytest.raises(RuntimeError, match="out_features of 64"):
        avx512.int4pack_linear(x, q4.packed, q4.scales_zeros)
    q4 = quantize_int4(weight)
    with pytest.raises(RuntimeError, match="scales_zeros must be contiguous bfloat16"):
        avx512.int4pack_linear(x, q4.packed, q4.scales_zeros[:1])


@needs_avx512
def test_a_kernel_call_leaves_the_compute_threads_count_alone() -> None:
    weight = torch.randn(64, 64, dtype=BF16)
    q, q4 = quantize_int8(weight), quantize_int4(weight)
    x = torch.randn(6, 64, dtype=BF16)

    def kernels() -> None:
        avx512.pack(weight).linear(x, None)
        avx512.int8_linear(x, q.codes, q.scales)
        avx512.int4pack_linear(x, q4.packed, q4.scales_zeros)

    assert threads_after(kernels) == 2


@needs_serving
def test_bf16_weights_are_kept_in_the_pair_layout_where_the_kernels_serve() -> None:
    assert not packs_weights(BF16, torch.device("cpu"))  # not oneDNN's
    runner = Runner(build_tiny_model(dtype=BF16).model)
    assert runner.pairs and not runner.packed
    layer = runner.layers[0]
    for weight in (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down):
        assert isinstance(weight, avx512.PairWeight)
    plain = Runner(build_tiny_model(dtype=BF16).model, pack_weights=False)
    assert not plain.pairs and isinstance(plain.layers[0].w_o, torch.Tensor)


@needs_avx512
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_a_weight_in_the_pair_layout_is_f_linear(
    out_features: int, in_features: int, rows: int
) -> None:
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features, dtype=BF16)
    packed = avx512.pack(weight)
    assert packed.nbytes == weight.numel() * 2
    x = torch.randn(rows, in_features, dtype=BF16)
    bias = torch.randn(out_features, dtype=BF16)
    got = packed.linear(x, bias)
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    assert relative_error(got, F.linear(x.float(), weight.float(), bias.float())) < TOLERANCE


@needs_serving
@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 6])
def test_a_bf16_decode_batch_through_the_kernels_gives_onednns_and_pytorchs_logits(
    mode: str, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against what the engine computes without them: oneDNN's packed bf16 (none), or
    PyTorch's weight-only kernels (int8, int4; ours quantise the activations too)."""
    loaded = build_tiny_model(dtype=BF16)
    ours_runner = Runner(loaded.model, quantize=mode)
    ids = torch.randint(
        0, ours_runner.vocab_size, (rows, 24), generator=torch.Generator().manual_seed(4)
    )
    calls: list[str] = []
    for name in ("pair_linear", "int8_vnni_linear", "int4_vnni_linear"):
        monkeypatch.setattr(avx512, name, spy(getattr(avx512, name), calls, lambda *_, n=name: n))
    ours = prefill_then_decode(ours_runner, ids, capacity=32)[1]
    expected = {"none": "pair_linear", "int8": "int8_vnni_linear", "int4": "int4_vnni_linear"}[mode]
    assert expected in calls
    monkeypatch.setattr(avx512, "serves", lambda: False)
    theirs_runner = Runner(loaded.model, quantize=mode, pack_weights=None)
    assert theirs_runner.packed == (mode == "none")
    calls.clear()
    theirs = prefill_then_decode(theirs_runner, ids, capacity=32)[1]
    assert not calls
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.05, atol=0.05)
    # Quantised activations move a random model's near ties: each row's greedy token
    # is one the other logits also rank top, within the two results' largest difference.
    gap = float((ours.float() - theirs.float()).abs().max())
    chosen = theirs.float().gather(1, ours.argmax(-1, keepdim=True))[:, 0]
    assert (chosen >= theirs.float().max(-1).values - gap).all()


@needs_serving
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_row_count_of_a_quantised_layer_takes_the_kernels(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(5)
    q = quant.quantize(torch.randn(128, 96, dtype=BF16) * 0.05, mode)
    calls: list[int] = []
    name = "int8_linear" if mode == "int8" else "int4pack_linear"
    monkeypatch.setattr(avx512, name, spy(getattr(avx512, name), calls, lambda x, *_: x.shape[0]))
    for rows in (1, 16, 512):
        x = torch.randn(rows, 96, dtype=BF16)
        got = q.linear(x, None)
        assert relative_error(got, F.linear(x.float(), float_weight(q))) < TOLERANCE
    assert calls == [1, 16, 512]


@needs_avx512
@pytest.mark.parametrize(
    ("rows", "kv_heads", "group", "head_dim"),
    [(1, 3, 3, 64), (3, 2, 1, 32), (17, 1, 8, 128), (4, 2, 4, 256)],
)
def test_decode_attention_is_sdpa_over_each_rows_positions(
    rows: int, kv_heads: int, group: int, head_dim: int
) -> None:
    # 53 positions: not a multiple of 16 (the exp's vectors)
    q, k, v, lengths = attention_case(rows, kv_heads, group, head_dim, 53, BF16)
    got = avx512.decode_attention(q, k, v, lengths, 0.1)
    want = sdpa_over_lengths(q, k, v, lengths, 0.1)
    assert got.dtype == BF16 and got.shape == (rows, kv_heads * group * head_dim)
    assert relative_error(got, want) < TOLERANCE


@needs_avx512
def test_decode_attention_refuses_what_it_cannot_hold_or_read() -> None:
    k = v = torch.zeros(2, 1, 8, 64, dtype=BF16)
    q = torch.zeros(2, 1, 2, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 9 is outside 1..8"):
        avx512.decode_attention(q, k, v, torch.tensor([3, 9]), 1.0)
    with pytest.raises(RuntimeError, match="q must be bfloat16"):
        avx512.decode_attention(q.float(), k, v, torch.tensor([1, 1]), 1.0)
    with pytest.raises(RuntimeError, match="at most 8 query heads per kv head, not 9"):
        avx512.decode_attention(
            torch.zeros(2, 1, 9, 64, dtype=BF16), k, v, torch.tensor([1, 1]), 1.0
        )
    small = torch.zeros(2, 1, 8, 48, dtype=BF16)
    with pytest.raises(RuntimeError, match="head_dim must be a multiple of 32"):
        avx512.decode_attention(
            torch.zeros(2, 1, 2, 48, dtype=BF16), small, small, torch.tensor([1, 1]), 1.0
        )


@needs_avx512
def test_a_bf16_decode_step_through_the_attention_kernel_gives_sdpas_logits() -> None:
    loaded = build_tiny_model(dtype=BF16, hidden_size=128)  # head_dim 32
    runner = Runner(loaded.model)
    assert runner._attention is avx512
    ours = ragged_decode_step(runner)
    runner._attention = None
    sdpa = ragged_decode_step(runner)
    torch.testing.assert_close(ours.float(), sdpa.float(), rtol=0.05, atol=0.05)
    # A random bf16 model has near ties: each row's greedy token is one SDPA's logits
    # also rank top, within the two results' largest difference.
    gap = float((ours.float() - sdpa.float()).abs().max())
    chosen = sdpa.float().gather(1, ours.argmax(-1, keepdim=True))[:, 0]
    assert (chosen >= sdpa.float().max(-1).values - gap).all()


# The VNNI kernels: int8/int4 weights against activations quantised in each call.


def quantized_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the VNNI kernels quantise it, written independently of the kernel: each
    block of 32 inputs of a row as int8 codes a (float) and its scale s = max |x| / 127,
    x ~ s * a, rounded to nearest (ties to even)."""
    rows, k = x.shape
    blocks = x.float().view(rows, k // 32, 32)
    top = blocks.abs().amax(-1)
    inverse = torch.where(top > 0, 127 / top, torch.zeros_like(top))  # float32, as the kernel
    return torch.round(blocks * inverse[..., None]), top / 127


def through_quantized_x(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (float64) with x quantised as the kernels do."""
    codes, scales = quantized_x(x)
    n, k = weight.shape
    per_block = torch.einsum("mbj,nbj->mnb", codes.double(), weight.double().view(n, k // 32, 32))
    return (per_block * scales.double()[:, None, :]).sum(-1)


def int4_case(out_features: int, in_features: int) -> tuple[quant.Int4Weight, torch.Tensor]:
    """An int4 weight (quant.py's layout) and the float32 weight it stands for."""
    q = quantize_int4(torch.randn(out_features, in_features, dtype=BF16) * 0.05)
    return q, float_weight(q)


def int8_groups(out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 codes with a scale per channel and group of 32 in the VNNI int8 layout,
    and the float32 weight they stand for (the scales rounded to bf16, as kept)."""
    codes = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scales = (torch.rand(out_features, in_features // 32) * 0.001).to(BF16).float()
    weight = codes.float().view(out_features, -1, 32) * scales[..., None]
    return avx512.pack_int8_vnni(codes, scales), weight.view(out_features, in_features)


VNNI_SHAPES = [(16, 32), (960, 576), (48, 1536)]
# One row (four channel blocks at once, three, two, one), two and three (two blocks),
# four to eight (one block), and more rows split into even tiles of at most eight.
VNNI_ROWS = [1, 2, 3, 4, 5, 8, 9, 17, 40]


@needs_avx512
@pytest.mark.parametrize(("out_features", "in_features"), VNNI_SHAPES)
@pytest.mark.parametrize("rows", VNNI_ROWS)
def test_int8_vnni_multiplies_the_weight_by_the_quantised_rows(
    out_features: int, in_features: int, rows: int
) -> None:
    torch.manual_seed(rows)
    packed, weight = int8_groups(out_features, in_features)
    # The codes' bytes and a bf16 scale per 32 of them.
    assert packed.dtype == torch.uint8 and packed.numel() == weight.numel() * 34 // 32
    x = torch.randn(rows, in_features, dtype=BF16)
    got = avx512.int8_vnni_linear(x, packed)
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    assert relative_error(got, through_quantized_x(x, weight)) < TOLERANCE
    # Quantising the rows costs about 0.6 % on normal activations, not more.
    assert relative_error(got, F.linear(x.float(), weight)) < 0.015


@needs_avx512
# Whole 64-channel blocks: the int4 layouts quant.py reads back.
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 32), (960, 576), (128, 1536)])
@pytest.mark.parametrize("rows", VNNI_ROWS)
def test_int4_vnni_multiplies_the_weight_by_the_quantised_rows(
    out_features: int, in_features: int, rows: int
) -> None:
    torch.manual_seed(rows)
    q, weight = int4_case(out_features, in_features)
    vnni = quant.for_kernels(q, BF16)
    assert isinstance(vnni, quant.Int4Vnni)
    x = torch.randn(rows, in_features, dtype=BF16)
    got = vnni.linear(x, None)
    assert got.dtype == BF16 and got.shape == (rows, out_features)
    # The layout keeps each group's scale and offset (zero - 8 scale) in bf16.
    assert relative_error(got, through_quantized_x(x, weight)) < 2 * TOLERANCE
    assert relative_error(got, F.linear(x.float(), weight)) < 0.015


@needs_avx512
def test_a_row_gives_the_same_result_alone_and_in_a_batch() -> None:
    # Each row is quantised on its own: batching never changes a stream's tokens.
    torch.manual_seed(8)
    q8 = quant.Int8Vnni(int8_groups(128, 64)[0])
    q4 = quant.for_kernels(quantize_int4(torch.randn(128, 64, dtype=BF16)), BF16)
    assert isinstance(q4, quant.Int4Vnni)
    x = torch.randn(17, 64, dtype=BF16) * torch.logspace(-3, 3, 17)[:, None].to(BF16)
    for q in (q8, q4):
        batch = q.linear(x, None)
        for r in (0, 5, 16):
            assert torch.equal(q.linear(x[r : r + 1], None)[0], batch[r])


@needs_avx512
def test_an_all_zero_block_and_large_values_stay_finite_and_exact() -> None:
    torch.manual_seed(9)
    packed, weight = int8_groups(32, 96)
    x = torch.randn(3, 96, dtype=BF16)
    x[0, 32:64] = 0  # a block whose scale is 0
    x[1] *= 1e4  # the quantiser scales per block, whatever the magnitude
    x[2] = 0
    got = avx512.int8_vnni_linear(x, packed)
    assert torch.isfinite(got).all() and not got[2].any()
    assert relative_error(got[:2], through_quantized_x(x[:2], weight)) < TOLERANCE


@needs_avx512
def test_the_int8_vnni_layout_gives_back_any_channels_weights() -> None:
    codes = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    scales = torch.rand(48, 2).to(BF16).float()
    packed = avx512.pack_int8_vnni(codes, scales)
    ids = torch.tensor([0, 47, 17, 17, 31])
    weights = codes.float().view(48, 2, 32) * scales[..., None]  # a scale per group of 32
    got = avx512.int8_vnni_embed(packed, ids)
    assert got.dtype == BF16 and torch.equal(got, weights.view(48, 64)[ids].to(BF16))
    assert avx512.int8_vnni_embed(packed, torch.tensor([], dtype=torch.long)).shape == (0, 64)
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 48 is outside 0..47"):
        avx512.int8_vnni_embed(packed, torch.tensor([3, 48]))
    with pytest.raises(RuntimeError, match="ids must be a contiguous 1-D int64 tensor"):
        avx512.int8_vnni_embed(packed, torch.tensor([3.0]))


@needs_avx512
def test_the_vnni_kernels_refuse_bad_input_with_what_is_wrong() -> None:
    packed = int8_groups(32, 64)[0]
    x = torch.randn(2, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        avx512.int8_vnni_linear(x.float(), packed)
    with pytest.raises(RuntimeError, match="32 columns, the weight 64"):
        avx512.int8_vnni_linear(x[:, :32], packed)
    with pytest.raises(RuntimeError, match="packed must be the contiguous uint8 VNNI int8"):
        avx512.int8_vnni_linear(x, torch.zeros(32, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="packed must be the contiguous uint8 VNNI int4"):
        avx512.int4_vnni_linear(x, packed)  # 1,088 bytes a row: not whole groups of 320
    q4 = quant.for_kernels(quantize_int4(torch.randn(64, 64, dtype=BF16)), BF16)
    assert isinstance(q4, quant.Int4Vnni)
    with pytest.raises(RuntimeError, match="32 columns, the weight 64"):
        q4.linear(x[:, :32], None)
    empty = torch.zeros(0, 64, dtype=BF16)
    assert avx512.int8_vnni_linear(empty, packed).shape == (0, 32)
    assert q4.linear(empty, None).shape == (0, 64)


@needs_avx512
def test_the_vnni_kernels_leave_the_compute_threads_count_alone() -> None:
    q8 = quant.Int8Vnni(int8_groups(64, 64)[0])
    q4 = quant.for_kernels(quantize_int4(torch.randn(64, 64, dtype=BF16)), BF16)
    x = torch.randn(6, 64, dtype=BF16)

    def kernels() -> None:
        q8.linear(x, None)
        q4.linear(x, None)

    assert threads_after(kernels) == 2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_for_keeps_quant_pys_layouts_where_the_vnni_kernels_do_not_serve(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kind = quant.Int8Weight if mode == "int8" else quant.Int4Weight
    weight = torch.randn(64, 64, dtype=BF16)
    assert isinstance(quant.quantize_for(weight, mode, torch.float32), kind)  # float32 x
    # 48 channels: not a shape that avx512 fits
    assert isinstance(quant.quantize_for(torch.randn(48, 64, dtype=BF16), mode, BF16), kind)
    monkeypatch.setattr(avx512, "serves", lambda: False)
    assert isinstance(quant.quantize_for(weight, mode, BF16), kind)


@needs_serving
def test_int8_for_the_vnni_kernels_scales_each_group_and_loses_less_than_per_channel() -> None:
    torch.manual_seed(10)
    # Groups of a row 100x apart in magnitude: one scale per channel leaves the small
    # groups few codes.
    weight = (torch.randn(64, 8, 32) * torch.logspace(-2, 0, 8)[None, :, None]).view(64, 256)
    weight = weight.to(BF16)
    grouped = quant.quantize_for(weight, "int8", BF16)
    assert isinstance(grouped, quant.Int8Vnni)
    ids = torch.arange(64)
    by_group = relative_error(grouped.rows(ids), weight)
    by_channel = relative_error(quantize_int8(weight).rows(ids), weight)
    assert by_group < 0.5 * by_channel
    x = torch.randn(3, 256, dtype=BF16)
    want = through_quantized_x(x, grouped.rows(ids).float())
    assert relative_error(grouped.linear(x, None), want) < TOLERANCE


@needs_serving
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantised_bf16_runner_keeps_its_weights_in_the_vnni_layout(mode: str) -> None:
    model = build_tiny_model(dtype=BF16).model
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as the demo model's
    runner = Runner(model, quantize=mode)
    kind = quant.Int8Vnni if mode == "int8" else quant.Int4Vnni
    for layer in runner.layers:
        for weight in (layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down):
            assert isinstance(weight, kind)
    assert isinstance(runner.lm_head, quant.Int8Vnni)
    assert runner.embed is runner.lm_head  # the embedding reads the head's codes
    ids = torch.tensor([3, 0, 250, 3])
    embedded = runner.embed.rows(ids)
    assert embedded.dtype == BF16
    assert relative_error(embedded, model.lm_head.weight.detach()[ids]) < 0.01


# A decode step's layers in one call (avx512.decode_layers).


def decode_steps(runner: Runner, steps: int = 3) -> tuple[torch.Tensor, KVCache]:
    """Logits of `steps` decode steps over five rows of ragged lengths (prefilled
    first, every row one step further each time) and the cache after them."""
    rows, length = 5, 20
    ids = torch.randint(
        0, runner.vocab_size, (rows, length), generator=torch.Generator().manual_seed(3)
    )
    cache = runner.new_cache(rows, 32)
    pos = torch.tensor([length - 2 * r for r in range(rows)])
    for r in range(rows):
        runner.prefill(cache, [(r, ids[r, : int(pos[r])], 0)])
    logits = []
    for step in range(steps):
        tokens = ids[torch.arange(rows), (pos + step) % length]
        width = int(pos.max()) + 1
        batch = DecodeBatch(
            tokens=tokens,
            positions=pos,
            write_index=runner.write_rows(cache, pos),
            mask=(torch.arange(width)[None] <= pos[:, None])[:, None, None],
            rows=torch.arange(rows),
        )
        logits.append(runner.forward(cache, batch, []))
        pos = pos + 1
    assert isinstance(cache, KVCache)
    return torch.stack(logits), cache


@needs_serving
@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_a_decode_steps_layers_in_one_call_are_the_runners_loop_bit_for_bit(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_model(dtype=BF16, hidden_size=128, num_layers=3).model  # head_dim 32
    runner = Runner(model, quantize=mode)
    stack = runner._stack
    assert stack is not None
    calls: list[int] = []
    monkeypatch.setattr(
        avx512, "decode_layers", spy(avx512.decode_layers, calls, lambda x, *_: x.shape[0])
    )
    ours, our_cache = decode_steps(runner)
    assert calls == [5, 5, 5]  # every decode step, no prefill
    runner._stack = None
    loop, loop_cache = decode_steps(runner)
    assert calls == [5, 5, 5]
    assert torch.equal(ours, loop)
    assert torch.equal(our_cache.k, loop_cache.k) and torch.equal(our_cache.v, loop_cache.v)


@needs_serving
def test_layers_one_call_cannot_run_keep_the_loop() -> None:
    tokenizer = build_tiny_model().tokenizer
    qwen3 = build_family("qwen3", tokenizer).model.to(BF16)  # per-head norms
    assert Runner(qwen3)._attention is avx512
    assert Runner(qwen3)._stack is None
    llama = build_tiny_model(dtype=BF16, hidden_size=128).model
    assert Runner(llama, pack_weights=False)._stack is None  # plain weights
    assert Runner(build_tiny_model(hidden_size=128).model)._stack is None  # float32
    with_bias = build_tiny_model(dtype=BF16, hidden_size=128).model
    with torch.no_grad():
        o_proj = with_bias.model.layers[1].self_attn.o_proj
        o_proj.bias = torch.nn.Parameter(torch.ones(o_proj.out_features, dtype=BF16))
    assert Runner(with_bias)._stack is None


@needs_serving
def test_decode_layers_refuses_a_stack_that_does_not_match_the_cache() -> None:
    runner = Runner(build_tiny_model(dtype=BF16, hidden_size=128).model)
    stack = runner._stack
    assert stack is not None
    cache = runner.new_cache(1, 32)
    pos = torch.tensor([0])
    x = torch.randn(1, 128, generator=torch.Generator().manual_seed(2)).to(BF16)

    def run(layers: avx512.LayerStack) -> torch.Tensor:
        return avx512.decode_layers(
            x,
            layers,
            rotary=(runner.cos[pos], runner.sin_signed[pos]),
            cache=(cache.k, cache.v),
            rows=runner.write_rows(cache, pos),
            lengths=pos + 1,
            shape=(runner.n_heads, runner.n_kv_heads, runner.scaling, runner.eps),
        )

    with pytest.raises(RuntimeError, match="6 tensors a layer, 12 in all, not 11"):
        run(avx512.LayerStack(stack.weights[:-1], stack.kinds))
    with pytest.raises(RuntimeError, match="kinds: 7 is not a projection kind"):
        run(avx512.LayerStack(stack.weights, [*stack.kinds[:-1], 7]))  # the last layer's
    assert not cache.k.any() and not cache.v.any()  # refused before a write
    # and the runner goes on serving
    assert run(stack).shape == (1, 128)
    assert cache.k.any()
