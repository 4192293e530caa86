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


class GgufInt4:
    """A GGUF file's Q4_0/Q4_1 projections, decoded and checked one module at a time.

    One at a time so that loading holds one layer's codes beside the model, not the
    whole file's (the demo model's peak RSS went from 1.65 to 1.2 GiB).
    """

    def __init__(self, path: Path, model: Any) -> None:
        import gguf

        self.path = path
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        self.arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch), None)
        config = model.config
        tensors = {t.name: t for t in reader.tensors}
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        # By id(module): the module's name and its GGUF tensor, for 4-bit ones only.
        self._tensors: dict[int, tuple[str, Any]] = {}
        if arch is None:  # an architecture the gguf library does not know: none kept
            return
        names = gguf.get_tensor_name_map(arch, int(config.num_hidden_layers))
        for name, module in model.named_modules():
            gguf_name = names.get_name(name) if isinstance(module, torch.nn.Linear) else None
            tensor = tensors.get(f"{gguf_name}.weight") if gguf_name else None
            if tensor is not None and tensor.tensor_type.name in ("Q4_0", "Q4_1"):
                self._tensors[id(module)] = (name, tensor)

    def blocks(self, module: Any) -> Int4Blocks | None:
        """`module`'s weight as the file's blocks, or None when the file has no 4-bit
        tensor for it or its blocks do not dequantise to the loaded weight."""
        entry = self._tensors.get(id(module))
        if entry is None or module.weight.shape[1] % BLOCK:
            return None
        name, tensor = entry
        out, cols = module.weight.shape
        blocks = _decode(np.asarray(tensor.data), tensor.tensor_type.name, (out, cols))
        if self.arch == "llama" and name.endswith(("q_proj", "k_proj")):
            n_head = self.heads if name.endswith("q_proj") else self.kv_heads
            blocks = blocks.rows(_unpermute(out, n_head))
        weight = module.weight.detach()
        if not torch.equal(blocks.dequantize().to(weight.dtype), weight):
            log.warning("%s: the blocks of %s differ from the loaded weight", self.path.name, name)
            return None
        return blocks
