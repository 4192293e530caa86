"""4-bit weights read straight from a GGUF file's Q4_0 / Q4_1 blocks.

A Q4_0/Q4_1 tensor stores each row in blocks of 32 weights: a float16 scale `d`
(Q4_1 also a float16 minimum `m`) and 32 four-bit codes `q`, the weight being
``d * (q - 8)`` (Q4_0) or ``d * q + m`` (Q4_1). That is the layout `quant.Int4Weight`
serves with groups of 32 (``(q - 8) * scale + zero``), so `--quantize int4` on such a
file takes the file's own codes instead of dequantising and quantising again: the
served weights are the file's, up to rounding the scales to the activations' dtype.

Every block set is checked against the weight transformers loaded from the same
file (both dequantised, then rounded to the model's dtype, must be equal): a tensor
whose name or row order this module gets wrong is quantised from the loaded weight
instead, and the runner logs how many projections came from the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
BLOCK = 32  # weights per Q4_0 / Q4_1 block


@dataclass(frozen=True)
class Int4Blocks:
    """One weight's 4-bit codes and per-block scale and minimum (``w = d * q + m``)."""

    codes: torch.Tensor  # uint8 [out, in], 0..15
    scales: torch.Tensor  # float32 [out, in / BLOCK]
    mins: torch.Tensor  # float32 [out, in / BLOCK]; -8 * scales for Q4_0
    symmetric: bool  # Q4_0: the file means d * (q - 8)

    def dequantize(self) -> torch.Tensor:
        """The float32 weights the file means (as llama.cpp and transformers compute them)."""
        out, cols = self.codes.shape
        q = self.codes.view(out, cols // BLOCK, BLOCK).float()
        d = self.scales[..., None]
        w = d * (q - 8) if self.symmetric else d * q + self.mins[..., None]
        return w.view(out, cols)

    def rows(self, order: torch.Tensor) -> Int4Blocks:
        """The same weight with its output rows reordered."""
        return Int4Blocks(self.codes[order], self.scales[order], self.mins[order], self.symmetric)


def _decode(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> Int4Blocks:
    """Blocks of a Q4_0 (18 bytes) or Q4_1 (20 bytes) tensor as codes, scales, minimums."""
    out, cols = shape
    head = 2 if kind == "Q4_0" else 4
    blocks = raw.reshape(out * cols // BLOCK, head + BLOCK // 2)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if kind == "Q4_0":
        mins = -8 * scales  # d * (q - 8) == d * q - 8d
    else:
        mins = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, head:]
    # Byte j of a block holds element j in its low nibble and element j + 16 in its high.
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=1)
    return Int4Blocks(
        torch.from_numpy(codes.reshape(out, cols).copy()),
        torch.from_numpy(scales.reshape(out, cols // BLOCK).copy()),
        torch.from_numpy(mins.reshape(out, cols // BLOCK).copy()),
        kind == "Q4_0",
    )


def _unpermute(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order undoing llama.cpp's query/key permutation (as transformers does on load)."""
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, dim, 2).transpose(1, 2).reshape(-1)


def read_int4_blocks(path: Path, model: Any) -> dict[str, Int4Blocks]:
    """The Q4_0/Q4_1 projections of `path`, by the model's module name, checked.

    Only modules whose blocks dequantise to the loaded weight are returned; the
    rest (other quantisation types, names or layouts this module does not know) are
    left for the caller to quantise.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    arch_name = bytes(field.parts[field.data[0]]).decode("utf-8")
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        return {}
    config = model.config
    names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
    tensors = {t.name: t for t in reader.tensors}
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    found: dict[str, Int4Blocks] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = names.get_name(module_name)
        tensor = tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if tensor is None or tensor.tensor_type.name not in ("Q4_0", "Q4_1"):
            continue
        out, cols = module.weight.shape
        if cols % BLOCK:
            continue
        blocks = _decode(np.asarray(tensor.data), tensor.tensor_type.name, (out, cols))
        if arch_name == "llama" and module_name.endswith(("q_proj", "k_proj")):
            n_head = heads if module_name.endswith("q_proj") else kv_heads
            blocks = blocks.rows(_unpermute(out, n_head))
        weight = module.weight.detach()
        if torch.equal(blocks.dequantize().to(weight.dtype), weight):
            found[module_name] = blocks
        else:
            log.warning("%s: %s's blocks do not match the loaded weight", path.name, module_name)
    return found
