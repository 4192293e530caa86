"""AVX2 kernels for the quantised layers in float32 (csrc/avx2_woq.cpp).

CPUs without AVX-512 BF16 run the engine in float32 (model_loading's "auto" dtype),
where PyTorch's weight-only kernels are slower than the float32 matmul they would
replace. csrc/avx2_woq.cpp streams the int8 codes or the packed int4 layout quant.py
already keeps, widening them in registers (one row) or once per block into L1
(several rows); built by cpu_kernels.py. quant.py calls it for float32 activations
wherever it runs; numbers in docs/models.md. Also here: a float32 matrix-vector
product for unquantised float32 layers at a few rows (MKL's is slow on AMD CPUs),
and a decode step's attention.
"""

from __future__ import annotations

import functools

import torch

from services.inference.engine.cpu_kernels import CpuExtension

__all__ = [
    "DENSE_ROWS",
    "EXTENSION",
    "available",
    "decode_attention",
    "dense_linear",
    "int4pack_linear",
    "int8_linear",
]

EXTENSION = CpuExtension(
    name="tokenyard_avx2_woq",
    source="avx2_woq.cpp",
    cflags=("-mavx2", "-mfma"),
    cpu_flags=frozenset({"avx2", "fma"}),
)


@functools.cache  # asked on every quantised matmul: one cached call
def available() -> bool:
    """Whether the kernels run here (checked, and built if needed, once)."""
    return EXTENSION.available()


def _require() -> None:
    if not available():
        raise RuntimeError("the AVX2 kernels do not run here (avx2.available() is False)")


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (codes * scales[:, None]).T`` for float32 `x` and scales."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx2.int8_linear(x.contiguous(), codes, scales)
    return out


def int4pack_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, block_n: int
) -> torch.Tensor:
    """``x @ w.T`` for float32 `x`, w in the CPU int4 layout of blocks of `block_n`
    channels with groups of 32 (float32 scales and zeros, ``w = (q - 8) * scale + zero``)."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx2.int4pack_linear(
        x.contiguous(), packed, scales_zeros, block_n
    )
    return out


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Each row's query heads ``q [rows, kv_heads, group, head_dim]`` against positions
    ``0..lengths[r]-1`` of cache slot r (``k``, ``v``: one layer's ``[slots, kv_heads,
    capacity, head_dim]``); returns ``[rows, kv_heads * group * head_dim]``."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx2.decode_attention(q, k, v, lengths, scale)
    return out


# Rows up to which float32 layers without quantisation take `dense_linear`.
DENSE_ROWS = 4


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for float32 `x` of 1 to `DENSE_ROWS` rows and a contiguous
    float32 weight ``[out, in]`` (in a multiple of 16)."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard_avx2.dense_linear(x.contiguous(), weight)
    return out
