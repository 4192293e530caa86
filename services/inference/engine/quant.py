"""Quantisation of the fast path's linear layers (CPU).

`--quantize int8` keeps each projection as int8 with one scale per output channel
(`torch.ops.aten._weight_int8pack_mm`); `--quantize int4` as 4-bit codes with a scale
and offset per group of `INT4_GROUP` input columns, in the layout of
`_weight_int4pack_mm_for_cpu`. Activations stay in the model's dtype (a decode step
reads a half or a quarter of the bytes), except where avx512.py's VNNI kernels serve
(`quantize_for`): there each call quantises its rows to int8 in blocks of 32 too.

The output head (and the embedding, which small models tie to it) is int8 in both
modes: on the demo model it is a fifth of the weights, so a bf16 head would leave
the weights at 0.60x (int8) and 0.43x (int4) of bf16; int4 on the head costs the
most quality for the least speed (bench/quality.py).

From `AMX_ROWS` rows on, CPUs with AMX run amx.py's kernels over the same layouts
for bf16 activations; CPUs with AVX-512 BF16 but no AMX, avx512.py's at every row
count; for float32 activations (CPUs without AVX-512 BF16), avx2.py's.
Dequantisation follows the kernels: int8 ``w = q * scale``; int4
``w = (q - 8) * scale + zero`` per group, q in 0..15. Numbers measured with
bench/quality.py and bench/engine_bench.py are in docs/models.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.inference.engine import amx, avx2, avx512
from services.inference.engine.gguf_blocks import BLOCK, Int4Blocks
from services.inference.settings import QUANTIZATIONS

__all__ = [
    "QUANTIZATIONS",
    "Int4Vnni",
    "Int4Weight",
    "Int8Vnni",
    "Int8Weight",
    "QuantizationError",
    "for_kernels",
    "quantize",
    "quantize_for",
]
# Input columns sharing one int4 scale and zero (the kernel takes 32, 64, 128 or 256).
# 32 measured best by far on the demo model (bench/quality.py, first 1600 tokens:
# perplexity +0.2 % against +37 % with 64): its weights come from a Q4_1 GGUF, whose
# groups of 32 the asymmetric min/max codes reproduce almost exactly.
INT4_GROUP = 32
# Without the AMX kernels below (another CPU, or float32 activations): rows from
# which a layer multiplies by its weight dequantised to the activations' dtype
# (oneDNN's matmul) instead of calling PyTorch's weight-only kernel. Those kernels
# unpack the weight again for every row, so their cost grows with the rows: a
# 512-token prompt of the demo model took 4.4-4.6x as long as in bf16 (int8 865 ms,
# int4 829 ms, bf16 189 ms). Dequantising costs the same whatever the rows (a
# 3072x576 weight: 0.5 ms int8, 1.7 ms int4). Where the two cross, measured on the
# demo model's prompts (2-core Xeon): int8 64 rows 143 ms either way, 128 rows 259
# against 163; int4 128 rows 218 against 250, 192 rows 325 against 278. So decode
# steps (up to 64 rows) keep the kernels, and prompt chunks past these take the
# dequantised weight (512 tokens: int8 219 ms, int4 289 ms).
INT8_DEQUANT_ROWS = 64
INT4_DEQUANT_ROWS = 160
# Rows from which a bf16 layer takes the AMX kernels where the CPU has them
# (amx.py), before the thresholds above. In the demo model, a 16-row decode step
# went from 73 (int8) and 59 (int4) ms to 39 and 39, against 44 in bf16; a
# 46-token prompt from 107 and 93 to 47 and 50 ms (bf16: 49-57); one row stays with
# PyTorch's kernels, faster there. Over the demo model's 120 projections (2-core
# Xeon, weights from memory, ms, one run: runs differ by 10-20 %) they cost about
# what bf16 does up to 16 rows, where PyTorch's kernels grow with the rows:
#   rows        1     4     8    16    64
#   bf16      16.0  15.1  15.9  16.0  22.5
#   int8      11.9  13.5  26.3  40.3 107.1  (PyTorch)
#   int8 AMX  12.8  13.7  16.0  18.2  33.4
#   int4       4.6   8.1  14.3  25.9  93.4  (PyTorch)
#   int4 AMX   8.2   9.9  11.2  14.6  33.8
AMX_ROWS = 8
# Rows below which float32 layers take the AVX2 kernels where they run (avx2.py);
# from there on, the dequantised weight above. Over the demo model's four
# projection shapes (2-core EPYC, ms, AVX2 kernel against dequantise + matmul):
#   rows      1     16    64   128   256   512
#   int8     0.3   2.2   6.0  11.8  22.5  46.2
#            8.4  10.2  12.3  20.9  30.7  40.4
#   int4     0.3   1.6   8.2  16.3  63.6 113.3
#            8.4  11.9  17.3  22.8  26.4  44.9
AVX2_INT8_ROWS = 384
AVX2_INT4_ROWS = 192
# Output channels per block of the CPU int4 kernel's packed layout, by the CPU
# PyTorch packs for: 64 with AVX-512, 32 with AVX2 (`int4_block_n` finds which).
_INT4_BLOCKS = (64, 32)


class QuantizationError(ValueError):
    """The model or device cannot be quantised as asked."""


@dataclass(frozen=True)
class Int8Weight:
    """A linear layer's weight as int8 codes and one scale per output channel."""

    codes: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # [out], in the activations' dtype

    @property
    def nbytes(self) -> int:
        """Bytes held (codes and scales)."""
        return _nbytes(self.codes, self.scales)

    def dequantized(self) -> torch.Tensor:
        """The weight in the activations' dtype, ``[out, in]``."""
        return torch.mul(self.codes, self.scales[:, None])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ w.T + bias`` for a 2-D `x`."""
        # Below INT8_DEQUANT_ROWS, the kernel: a 16-row decode step of the demo model took
        # 160 ms with it against 336 ms multiplying the codes cast to bf16 (best of 15,
        # loaded 2-core machine; bf16 packed: 102 ms).
        rows = x.shape[0]
        shape = (self.codes.shape[0], self.codes.shape[1])
        if avx512.takes(x, shape):
            out = avx512.int8_linear(x, self.codes, self.scales)
        elif rows < AVX2_INT8_ROWS and _avx2_runs(x, shape, 8):
            out = avx2.int8_linear(x, self.codes, self.scales)
        elif rows >= AMX_ROWS and _amx_runs(x, shape):
            out = amx.int8_linear(x, self.codes, self.scales)
        elif rows >= INT8_DEQUANT_ROWS:
            return F.linear(x, self.dequantized(), bias)
        else:
            out = torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scales)
        return out if bias is None else out + bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows `ids` (an embedding lookup on a tied table)."""
        return F.embedding(ids, self.codes).to(self.scales.dtype) * self.scales[ids, None]


@dataclass(frozen=True)
class Int4Weight:
    """A linear layer's weight as packed 4-bit codes, a scale and zero per group."""

    packed: torch.Tensor  # uint8, the CPU kernel's layout
    scales_zeros: torch.Tensor  # [in / group, out, 2], in the activations' dtype
    group: int
    unpackable: bool  # `_unpack_int4` reads `packed` back (checked when packed)

    @property
    def nbytes(self) -> int:
        """Bytes held (codes, scales and zeros)."""
        return _nbytes(self.packed, self.scales_zeros)

    def dequantized(self) -> torch.Tensor:
        """The weight in the activations' dtype, ``[out, in]``: ``(q - 8) * scale + zero``."""
        codes = _unpack_int4(self.packed)
        n, k = codes.shape
        scales, zeros = self.scales_zeros.transpose(0, 1).unbind(-1)  # [out, in / group]
        offsets = (zeros.float() - 8 * scales.float()).to(scales.dtype)
        groups = (n, k // self.group, 1)
        # mul then add_: half the time of one addcmul over the same broadcasts.
        out = torch.mul(codes.view(n, k // self.group, self.group), scales.reshape(groups))
        return out.add_(offsets.reshape(groups)).view(n, k)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ w.T + bias`` for a 2-D `x`."""
        rows = x.shape[0]
        shape = (self.packed.shape[0], self.packed.shape[1] * 2)
        ours = self.unpackable and self.group == BLOCK  # the layout the kernels read
        block = int4_block_n() or 0
        if ours and block == 64 and avx512.takes(x, shape):
            out = avx512.int4pack_linear(x, self.packed, self.scales_zeros)
        elif ours and rows < AVX2_INT4_ROWS and _avx2_runs(x, shape, block):
            out = avx2.int4pack_linear(x, self.packed, self.scales_zeros, block)
        elif ours and block == 64 and rows >= AMX_ROWS and _amx_runs(x, shape):
            out = amx.int4pack_linear(x, self.packed, self.scales_zeros)
        elif rows >= INT4_DEQUANT_ROWS and self.unpackable:
            return F.linear(x, self.dequantized(), bias)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.packed, self.group, self.scales_zeros
            )
        return out if bias is None else out + bias


@dataclass(frozen=True)
class Int8Vnni:
    """int8 with a scale per output channel and group of 32 inputs (as GGUF's Q8_0), in
    avx512.py's VNNI layout (`quantize_for`)."""

    packed: torch.Tensor  # uint8, avx512.pack_int8_vnni (bf16 activations only)
    kind = avx512.INT8_VNNI  # for avx512.decode_layers

    @property
    def nbytes(self) -> int:
        """Bytes held (codes and scales)."""
        return _nbytes(self.packed)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ w.T + bias`` for a 2-D bf16 `x`."""
        out = avx512.int8_vnni_linear(x, self.packed)
        return out if bias is None else out + bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised bf16 rows `ids` (an embedding lookup on a tied table)."""
        return avx512.int8_vnni_embed(self.packed, ids)


@dataclass(frozen=True)
class Int4Vnni:
    """An `Int4Weight` in avx512.py's VNNI layout (`for_kernels`)."""

    packed: torch.Tensor  # uint8, avx512.pack_int4_vnni
    kind = avx512.INT4_VNNI  # for avx512.decode_layers

    @property
    def nbytes(self) -> int:
        """Bytes held (codes, scales and offsets)."""
        return _nbytes(self.packed)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ w.T + bias`` for a 2-D bf16 `x`."""
        out = avx512.int4_vnni_linear(x, self.packed)
        return out if bias is None else out + bias


QuantWeight = Int8Weight | Int4Weight | Int8Vnni | Int4Vnni


def vnni_serves(dtype: torch.dtype, shape: tuple[int, int]) -> bool:
    """Whether a layer of `shape` ``(out, in)`` with `dtype` activations takes avx512.py's
    VNNI kernels here (`quantize_for`)."""
    return dtype is torch.bfloat16 and avx512.fits(shape) and avx512.serves()


def quantize_for(weight: torch.Tensor, mode: str, dtype: torch.dtype) -> QuantWeight:
    """`weight` ([out, in]) quantised as `mode` for `dtype` activations, in the layout of
    the fastest kernels for it here: avx512.py's VNNI layouts where those serve
    (`vnni_serves`; int8 there takes a scale per group of 32 inputs, as the kernel
    scales each group anyway: on the demo model's whole text, bench/quality.py,
    perplexity 0.996x bf16 against 1.011x with one scale per channel), else
    `quantize`'s."""
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if mode == "int8" and vnni_serves(dtype, shape):  # bf16 scales, as the layout keeps
        codes, scales = _symmetric_int8(weight, avx512.VNNI_BLOCK, torch.bfloat16)
        return Int8Vnni(avx512.pack_int8_vnni(codes, scales))
    quantized = quantize(weight, mode)
    return for_kernels(quantized, dtype) if isinstance(quantized, Int4Weight) else quantized


def for_kernels(weight: Int4Weight, dtype: torch.dtype) -> Int4Weight | Int4Vnni:
    """An int4 `weight` (quantised here or a GGUF's codes), for `dtype` activations, in
    avx512.py's VNNI layout where those kernels serve it (`vnni_serves`), else as it is.

    The VNNI kernels quantise the activations too, in blocks of 32 inputs, and
    multiply 64 byte pairs per instruction where the bf16 kernels widen every code
    and multiply 32. Over the demo model's 120 projections (2-core Zen 4, ms, best of
    7; bf16 in its pair layout for reference):
      rows          1     4     8    16    64
      bf16        7.6   7.0   7.7  11.1  33.3
      int8        6.5   6.7  16.0  19.5  41.7  (widened to bf16)
      int8 VNNI   4.3   4.1   4.8   8.1  24.5  (one scale per channel)
      int4        3.2   4.7   7.3  12.0  41.8  (widened to bf16)
      int4 VNNI   3.2   3.1   4.2   7.5  25.5
    """
    shape = (weight.packed.shape[0], weight.packed.shape[1] * 2)
    if not (weight.unpackable and weight.group == avx512.VNNI_BLOCK and vnni_serves(dtype, shape)):
        return weight
    scales, zeros = weight.scales_zeros.transpose(0, 1).float().unbind(-1)  # [out, in / group]
    offsets = zeros - 8 * scales  # w = (q - 8) * scale + zero = scale * q + offset
    return Int4Vnni(avx512.pack_int4_vnni(_unpack_int4(weight.packed), scales, offsets))


def _amx_runs(x: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether the AMX kernels take `x` against a weight of `shape` ``(out, in)``."""
    out_features, in_features = shape
    return (
        x.dtype is torch.bfloat16
        and out_features % 64 == 0
        and in_features % BLOCK == 0
        and amx.available()
    )


def _avx2_runs(x: torch.Tensor, shape: tuple[int, int], out_multiple: int) -> bool:
    """Whether the AVX2 kernels take float32 `x` against a weight of `shape` ``(out, in)``."""
    out_features, in_features = shape
    return (
        x.dtype is torch.float32
        and out_features % out_multiple == 0
        and in_features % BLOCK == 0
        and avx2.available()
    )


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _symmetric_int8(
    weight: torch.Tensor, group: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` and scales ``[out, in / group]`` (scale = max |w| / 127 per
    group of a row, rounded to `scale_dtype` before the codes are taken against it)."""
    out_features, in_features = weight.shape
    w = weight.detach().float().view(out_features, in_features // group, group)
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scales = scales.to(scale_dtype).float()
    codes = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.view(out_features, in_features), scales


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric int8 per output channel: scale = max |w| / 127 per row."""
    codes, scales = _symmetric_int8(weight, int(weight.shape[1]), torch.float32)
    return Int8Weight(codes.contiguous(), scales[:, 0].to(weight.dtype))


def quantize_int4(weight: torch.Tensor, group: int | None = None) -> Int4Weight:
    """Asymmetric 4-bit per group of `group` input columns (min/max to 0..15)."""
    group = group or INT4_GROUP
    out_features, in_features = weight.shape
    if in_features % group:
        raise QuantizationError(
            f"int4: a layer with {in_features} inputs does not split into groups of {group}"
        )
    w = weight.detach().float().view(out_features, in_features // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8)
    codes = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, 15)
    codes = codes.to(torch.int32).view(out_features, in_features)
    zeros = low + scales * 8  # the kernel computes (q - 8) * scale + zero
    return _pack_int4(codes, scales, zeros, weight.dtype, group)


def _pack_int4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype, group: int
) -> Int4Weight:
    """Codes 0..15 ``[out, in]`` and per-group scales and zeros ``[out, in / group]`` in
    the CPU kernel's layout (``w = (q - 8) * scale + zero``)."""
    scales_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 8)
    block = int4_block_n()
    unpackable = (
        block is not None
        and codes.shape[0] % block == 0
        and torch.equal(_unpack_int4(packed), codes.to(torch.uint8))
    )
    return Int4Weight(packed, scales_zeros.to(dtype), group, unpackable)


@functools.cache
def int4_block_n() -> int | None:
    """Channels per block of the layout PyTorch's CPU int4 kernel packs on this CPU
    (None: one `_unpack_int4` does not read)."""
    codes = torch.arange(128 * 64, dtype=torch.int32).view(128, 64) % 15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
    for block in _INT4_BLOCKS:
        if torch.equal(_unpack_int4(packed, block), codes.to(torch.uint8)):
            return block
    return None


def _unpack_int4(packed: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The codes ``[out, in]`` (uint8, 0..15) of the CPU int4 kernel's layout.

    For each block of B output channels (`int4_block_n`) the kernel keeps
    ``[in, B / 2]`` bytes, byte ``(k, j)`` holding channel j's code for input k in its
    low nibble and channel j + B / 2's in its high one (PyTorch 2.13; `_pack_int4`
    checks every weight it packs against this, and a layer that does not match keeps
    to the kernel).
    """
    block = block or int4_block_n() or _INT4_BLOCKS[0]
    n, k = packed.shape[0], packed.shape[1] * 2
    blocks = packed.view(n // block, k, block // 2)
    codes = torch.empty((n // block, block, k), dtype=torch.uint8)
    half = block // 2
    torch.bitwise_and(blocks, 15, out=codes[:, :half].transpose(1, 2))
    torch.bitwise_right_shift(blocks, 4, out=codes[:, half:].transpose(1, 2))
    return codes.view(n, k)


def int4_from_blocks(parts: list[Int4Blocks], dtype: torch.dtype) -> Int4Weight:
    """The int4 layout of GGUF Q4_0/Q4_1 weights (`parts` stacked by rows), codes kept.

    ``d * q + m == (q - 8) * d + (m + 8d)``: the file's scale is the group's scale and
    ``m + 8d`` its zero, both rounded to `dtype` as the kernel takes them.
    """
    scales = torch.cat([p.scales for p in parts])
    zeros = torch.cat([p.mins for p in parts]) + 8 * scales
    return _pack_int4(torch.cat([p.codes for p in parts]), scales, zeros, dtype, BLOCK)


def quantize(weight: torch.Tensor, mode: str) -> Int8Weight | Int4Weight:
    """`weight` ([out, in]) in the form `mode` names ("int8" or "int4")."""
    if mode == "int8":
        return quantize_int8(weight)
    if mode == "int4":
        return quantize_int4(weight)
    raise QuantizationError(f"quantize: expected one of {', '.join(QUANTIZATIONS)}, got {mode!r}")


def check_quantizable(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise `QuantizationError` unless `mode` runs on `device` with `dtype` activations."""
    if mode not in QUANTIZATIONS:
        raise QuantizationError(
            f"quantize: expected one of {', '.join(QUANTIZATIONS)}, got {mode!r}"
        )
    if mode == "none":
        return
    if device.type != "cpu":
        raise QuantizationError(
            f"--quantize {mode} runs on CPU only (PyTorch's CPU kernels); "
            f"the model is on {device}: use --quantize none there"
        )
    if dtype not in (torch.bfloat16, torch.float32):
        raise QuantizationError(f"--quantize {mode} needs bfloat16 or float32 weights, not {dtype}")
