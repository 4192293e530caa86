"""AVX-512 BF16 kernels for bf16 layers (csrc/avx512_woq.cpp).

CPUs with AVX-512 BF16 but without AMX (AMD Zen 4 and 5) run the engine in bf16,
where PyTorch's weight-only kernels unpack the weight again for every row (16
streams of int8 or int4 lost to bf16) and oneDNN's packed bf16 matmul carried a
fixed cost per call. csrc/avx512_woq.cpp widens each block of int8/int4 codes (the
layouts quant.py keeps) to bf16 once per call, keeps plain bf16 weights in a layout
of its own (`PairWeight`), and multiplies every row with VDPBF16PS; it also runs a
decode step's attention. The VNNI kernels (`int8_vnni_linear`, `int4_vnni_linear`)
quantise each call's rows of x to int8 in blocks of 32 and multiply integers with
VPDPBUSD, twice the products an instruction and no widening of the codes; the runner
keeps quantised weights in their layouts (quant.quantize_for). quant.py and the
runner call it where it `serves`; numbers in docs/models.md. Built by cpu_kernels.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from services.inference.engine import amx
from services.inference.engine.cpu_kernels import CpuExtension

__all__ = [
    "ATTENTION_MAX_DIM",
    "ATTENTION_MAX_GROUP",
    "EXTENSION",
    "available",
    "decode_attention",
    "decode_layers",
    "fits",
    "int4_vnni_linear",
    "int4pack_linear",
    "int8_linear",
    "int8_vnni_embed",
    "int8_vnni_linear",
    "pack",
    "pack_int4_vnni",
    "pack_int8_vnni",
    "pair_linear",
    "serves",
    "takes",
]

EXTENSION = CpuExtension(
    name="tokenyard_avx512_woq",
    source="avx512_woq.cpp",
    cflags=(
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx512bf16",
        "-mavx512vbmi",
        "-mavx512vnni",
    ),
    cpu_flags=frozenset(
        {
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512dq",
            "avx512_bf16",
            "avx512vbmi",
            "avx512_vnni",
        }
    ),
)


@functools.cache  # asked on every quantised matmul: one cached call
def available() -> bool:
    """Whether the kernels run here (checked, and built if needed, once)."""
    return EXTENSION.available()


@functools.cache
def serves() -> bool:
    """Whether bf16 layers take these kernels here: they run, and the CPU has no AMX
    (whose kernels, amx.py, and oneDNN's packed bf16 were measured there instead)."""
    return not amx.cpu_has_amx() and available()  # no build on AMX CPUs


def fits(shape: tuple[int, int]) -> bool:
    """Whether the kernels read a weight of `shape` ``(out, in)``."""
    out_features, in_features = shape
    return out_features % OUT_MULTIPLE == 0 and in_features % IN_MULTIPLE == 0


def takes(x: torch.Tensor, shape: tuple[int, int]) -> bool:
    """Whether `x` against a weight of `shape` ``(out, in)`` takes these kernels."""
    return x.dtype is torch.bfloat16 and fits(shape) and serves()


# What the kernels need of a weight's shape (int4: quant.py's int4 layout blocks 64).
OUT_MULTIPLE = 32
IN_MULTIPLE = 32


def _require() -> None:
    if not available():
        raise RuntimeError("the AVX-512 kernels do not run here (avx512.available() is False)")


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (codes * scales[:, None]).T`` for bf16 `x` and scales."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx512.int8_linear(x.contiguous(), codes, scales)
    return out


# The projection kinds `decode_layers` takes (csrc/avx512_woq.cpp's ProjectionKind):
# a weight in the pair layout, the VNNI int8 layout, the VNNI int4 layout.
PAIR, INT8_VNNI, INT4_VNNI = 0, 1, 2


@dataclass(frozen=True)
class PairWeight:
    """A bf16 weight kept in the kernels' own layout (`pack`): each block of 32 output
    channels as ``[in / 2][32 channels][2 inputs]``, the order VDPBF16PS multiplies.

    Against oneDNN's packed bf16 over the demo model's 210 projections (2-core Zen 5,
    ms, best of 7): 4.3 against 8.8 at one row, 6.0 against 11.3 at 8, 8.6 against
    13.5 at 16, 20.1 against 28.5 at 64 (the plain weight, read by a kernel like
    int8's, took 5.3, 12.4, 14.0, 27.1: a transpose per call from 5 rows on).
    """

    packed: torch.Tensor  # bf16 [out, in] elements, the pair layout
    out_features: int
    in_features: int
    kind = PAIR  # for decode_layers

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.packed.numel() * self.packed.element_size()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ w.T + bias`` for 2-D bf16 `x`."""
        out = pair_linear(x, self.packed)
        return out if bias is None else out + bias


def pack(weight: torch.Tensor) -> PairWeight:
    """A contiguous bf16 weight ``[out, in]`` (a shape that `fits`) in the pair layout."""
    _require()
    packed: torch.Tensor = torch.ops.tokenyard_avx512.pack_pairs(weight.contiguous())
    return PairWeight(packed, int(weight.shape[0]), int(weight.shape[1]))


def pair_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for bf16 `x` and w in the pair layout (`PairWeight.packed`)."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx512.pair_linear(x.contiguous(), packed)
    return out


# What `decode_attention` holds in registers: query heads per kv head, head_dim.
ATTENTION_MAX_GROUP = 8
ATTENTION_MAX_DIM = 256


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """avx2.decode_attention for bf16 (head_dim a multiple of 32 up to
    `ATTENTION_MAX_DIM`, at most `ATTENTION_MAX_GROUP` query heads per kv head)."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx512.decode_attention(q, k, v, lengths, scale)
    return out


def int4pack_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor
) -> torch.Tensor:
    """``x @ w.T`` for bf16 `x`, w in the CPU int4 layout of 64-channel blocks with
    groups of 32 (bf16 scales and zeros, ``w = (q - 8) * scale + zero``)."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx512.int4pack_linear(
        x.contiguous(), packed, scales_zeros
    )
    return out


# The VNNI kernels: int8/int4 weights against activations quantised to int8 in each
# call, in blocks of `VNNI_BLOCK` inputs with a scale each (csrc/avx512_woq.cpp).
VNNI_BLOCK = 32
_VNNI_LANES = 16  # output channels per vector
_INT8_GROUP_BYTES = 544  # a group of 16 channels: 512 bytes of codes, 16 bf16 scales
_INT4_GROUP_BYTES = 320  # 256 bytes of codes, 16 bf16 scales and 16 offsets


def pack_int8_vnni(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes ``[out, in]`` (a shape that `fits`) with a scale per channel and group of
    32 inputs (``[out, in / 32]``, ``w = code * scale``) in the VNNI int8 layout:
    ``[out / 16][in / 32][544]`` bytes, each group's codes + 128 as eight vectors of
    [16 channels][4 inputs], then the scales as bf16 ``[16]``."""
    n, k = codes.shape
    blocks, groups = n // _VNNI_LANES, k // VNNI_BLOCK
    shifted = (codes.to(torch.int16) + 128).to(torch.uint8)
    lanes = shifted.view(blocks, _VNNI_LANES, groups, 8, 4).permute(0, 2, 3, 1, 4)
    code_bytes = lanes.reshape(blocks, groups, 512)
    scale_bf16 = scales.to(torch.bfloat16).view(blocks, _VNNI_LANES, groups).transpose(1, 2)
    scale_bytes = scale_bf16.contiguous().view(torch.uint8).view(blocks, groups, 32)
    packed = torch.cat([code_bytes, scale_bytes], dim=-1)
    return packed.view(blocks, groups * _INT8_GROUP_BYTES).contiguous()


def int8_vnni_embed(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Output channels `ids` of a weight in the VNNI int8 layout, dequantised to bf16
    (``[len(ids), in]``, each code times its group's scale rounded once): a tied
    embedding's lookup."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx512.int8_vnni_embed(packed, ids.contiguous())
    return out


def pack_int4_vnni(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """4-bit codes ``[out, in]`` (uint8, 0..15) with a scale d and offset m per group of
    32 inputs (``[out, in / 32]``, ``w = d * q + m``) in the VNNI int4 layout:
    ``[out / 16][in / 32][320]`` bytes, each group's codes as four vectors of
    [16 channels][4 bytes] (byte j of vector s: input 8s + j low, 8s + 4 + j high),
    then d and m as bf16 ``[2][16]``."""
    n, k = codes.shape
    blocks, groups = n // _VNNI_LANES, k // VNNI_BLOCK
    halves = codes.view(blocks, _VNNI_LANES, groups, 4, 2, 4)
    nibbles = halves[..., 0, :] | (halves[..., 1, :] << 4)  # [block, channel, group, s, j]
    code_bytes = nibbles.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 256)
    dm = torch.stack([scales, offsets]).to(torch.bfloat16).view(2, blocks, _VNNI_LANES, groups)
    dm_bytes = dm.permute(1, 3, 0, 2).contiguous().view(torch.uint8).view(blocks, groups, 64)
    packed = torch.cat([code_bytes, dm_bytes], dim=-1)
    return packed.view(blocks, groups * _INT4_GROUP_BYTES).contiguous()


def int8_vnni_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for bf16 `x`, w in the VNNI int8 layout."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx512.int8_vnni_linear(x.contiguous(), packed)
    return out


def int4_vnni_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for bf16 `x`, w in the VNNI int4 layout."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx512.int4_vnni_linear(x.contiguous(), packed)
    return out


@dataclass(frozen=True)
class LayerStack:
    """A model's decoder layers as `decode_layers` takes them: per layer its input norm,
    QKV, output, post-attention norm, gate/up and down weights (the projections'
    packed tensors) and the four projections' kinds (`PAIR`, `INT8_VNNI`,
    `INT4_VNNI`)."""

    weights: list[torch.Tensor]
    kinds: list[int]


def decode_layers(
    x: torch.Tensor,
    stack: LayerStack,
    *,
    rotary: tuple[torch.Tensor, torch.Tensor],
    cache: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    lengths: torch.Tensor,
    shape: tuple[int, int, float, float],
) -> torch.Tensor:
    """A decode step's decoder layers in one call, the runner's loop bit for bit:
    `x` ([rows, hidden] bf16, the residual stream) updated in place and returned.
    `rotary`: cos and sin as tokenyard_ops.rope_write_ takes them; `cache`: keys and
    values ``[layers, slots, kv_heads, capacity, head_dim]``; `rows` their rows to
    write (rope_write_'s); `lengths`: positions each row attends to;
    `shape`: query heads, kv heads, attention scale, RMSNorm epsilon."""
    _require()
    q_heads, kv_heads, scale, eps = shape
    out: torch.Tensor = torch.ops.tokenyard_avx512.decode_layers(
        x, stack.weights, stack.kinds, *rotary, *cache, rows, lengths, scale, eps, q_heads, kv_heads
    )
    return out
