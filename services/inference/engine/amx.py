"""AMX kernels for the quantised layers (csrc/amx_woq.cpp), built on first use.

PyTorch's int8/int4 weight-only CPU kernels unpack the weight again for every row,
so with 16 streams a quantised decode step lost to bf16. On CPUs with AMX (Intel
Xeon 4th generation and later) csrc/amx_woq.cpp dequantises each block of 16 output
channels once per call and multiplies every row with AMX tiles; it reads the
weights in the layouts quant.py already keeps, so nothing is stored twice.
quant.py calls it from `AMX_ROWS` rows up; numbers in docs/models.md.

The extension is built by cpu_kernels.py. Without AMX, a compiler or ``ninja``,
`available` is False and quant.py keeps to PyTorch's kernels: same results, slower
from 8 rows on.
"""

from __future__ import annotations

import functools
import logging

import torch

from services.inference.engine.cpu_kernels import CpuExtension

log = logging.getLogger(__name__)
__all__ = ["EXTENSION", "available", "build", "cpu_has_amx", "int4pack_linear", "int8_linear"]

EXTENSION = CpuExtension(
    name="tokenyard_amx_woq",
    source="amx_woq.cpp",
    cflags=(
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mavx512bf16",
        "-mamx-tile",
        "-mamx-bf16",
    ),
    cpu_flags=frozenset(
        {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "amx_tile", "amx_bf16"}
    ),
)


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether this CPU runs the kernels (every flag in Linux's /proc/cpuinfo)."""
    return EXTENSION.runs_on(cpuinfo)


def build() -> None:
    """Compile (or load the cached build of) the extension; raises if it cannot."""
    EXTENSION.build()


@functools.cache
def available() -> bool:
    """Whether the AMX kernels run here (checked, and built if needed, once)."""
    if not EXTENSION.available():
        return False
    ok: bool = torch.ops.tokenyard.amx_available()
    if not ok:
        log.warning("AMX kernels unavailable: the kernel refused AMX to this process")
    return ok


def _require() -> None:
    if not available():
        raise RuntimeError("the AMX kernels do not run here (amx.available() is False)")


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (codes * scales[:, None]).T`` for bf16 `x`."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard.int8_linear(x.contiguous(), codes, scales)
    return out


def int4pack_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor
) -> torch.Tensor:
    """What ``_weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros)`` computes, for
    bf16 `x` (codes exact, each group's scale and offset applied in float32)."""
    _require()
    out: torch.Tensor = torch.ops.tokenyard.int4pack_linear(x.contiguous(), packed, scales_zeros)
    return out
