"""Which model families the engine's own forward pass serves, and how it reads them.

The fast path covers decoders with Llama's shape: RMSNorm before attention and MLP,
rotary positions, grouped-query attention and a SiLU-gated MLP. The families differ
only in details that `Runner` reads from here: biases on the projections (Qwen2),
RMSNorm on each query and key head (Qwen3), projections stored fused (Phi-3),
rotary on part of each head (Phi-4-mini) and a sliding attention window (Mistral).
A config outside what is checked below goes to the generic path instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.inference.engine.avx512 import PairWeight
from services.inference.engine.quant import QuantWeight

FAST_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
# Rotary types whose tables depend on the position only. "dynamic" and "longrope"
# change their frequencies with the sequence's length: those models go generic.
STATIC_ROPE_TYPES = frozenset({"default", "llama3", "yarn"})


class UnsupportedModelError(ValueError):
    """The model's architecture is not one the engine's own forward pass implements."""


def rope_type(config: Any) -> str:
    """The config's rotary type ("default" when it names none)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return "default"
    return str(params.get("rope_type", params.get("type", "default")))


def check_fast_path(config: Any) -> None:
    """Raise `UnsupportedModelError` saying why, unless the fast path serves `config`."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAST_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} has no fast path "
            f"(fast: {', '.join(sorted(FAST_MODEL_TYPES))})"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"activation {act!r} is not supported on the fast path")
    rope = rope_type(config)
    if rope not in STATIC_ROPE_TYPES:
        raise UnsupportedModelError(f"rotary type {rope!r} is not supported on the fast path")
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % kv_heads:
        raise UnsupportedModelError(f"{heads} query heads do not group over {kv_heads} kv heads")


def attention_span(config: Any) -> int:
    """Positions a sequence may use on the fast path.

    A sliding window masks nothing while a sequence is no longer than the window, so
    capping the context at the window keeps the full-attention pass exact (Mistral
    7B v0.1: 4096 of 32768 positions; Qwen2/3 set a window only with
    `use_sliding_window`, which transformers folds into `sliding_window`).
    """
    span = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0:
        span = min(span, window)
    return span


# A projection's weight as the runner keeps it: plain or oneDNN-packed, quantised,
# or in avx512.py's pair layout.
Weight = torch.Tensor | QuantWeight | PairWeight


@dataclass
class Layer:
    """One decoder layer's weights as the runner uses them."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    w_qkv: Weight
    b_qkv: torch.Tensor | None
    w_o: Weight
    b_o: torch.Tensor | None
    w_gate_up: Weight
    b_gate_up: torch.Tensor | None
    w_down: Weight
    b_down: torch.Tensor | None
    q_norm: torch.Tensor | None  # per-head RMSNorm weights (Qwen3)
    k_norm: torch.Tensor | None


def qkv_modules(layer: Any) -> tuple[Any, ...]:
    """The query, key and value projections, in that order (one module when fused)."""
    attn = layer.self_attn
    if hasattr(attn, "qkv_proj"):  # Phi-3: already [q; k; v]
        return (attn.qkv_proj,)
    return (attn.q_proj, attn.k_proj, attn.v_proj)


def gate_up_modules(layer: Any) -> tuple[Any, ...]:
    """The MLP's gate and up projections, in that order (one module when fused)."""
    mlp = layer.mlp
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: already [gate; up]
        return (mlp.gate_up_proj,)
    return (mlp.gate_proj, mlp.up_proj)


def head_norms(layer: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weights of the per-head query and key RMSNorms, or (None, None)."""
    attn = layer.self_attn
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is None or k_norm is None:
        return None, None
    return q_norm.weight.detach(), k_norm.weight.detach()


def bias(module: Any) -> torch.Tensor | None:
    """The module's bias, detached, or None."""
    value = getattr(module, "bias", None)
    return None if value is None else value.detach()


def cat_bias(*modules: Any) -> torch.Tensor | None:
    """The biases of modules fused into one projection (zeros where one has none)."""
    biases = [bias(m) for m in modules]
    if all(b is None for b in biases):
        return None
    parts = [
        b
        if b is not None
        else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device)
        for b, m in zip(biases, modules, strict=True)
    ]
    return torch.cat(parts)
