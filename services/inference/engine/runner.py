"""The fast path: a lean batched forward pass for Llama-shaped decoders over a slot KV cache.

Why not call the transformers model each step: its eager forward costs ~45 ms per
decode step on the 2-core CPU whatever the batch, mostly Python and dispatch. This
runner reads the same weights (fused QKV and gate/up projections, precomputed
rotary tables) and issues a handful of tensor ops per layer, so a decode step costs
little more than its matmuls; on AVX-512 BF16 CPUs a decode step's layers run in one
call (`avx512.decode_layers`, the same ops in C++). Numerics follow transformers
exactly (same op order and dtypes) for each family in families.py, which the unit
tests check token for token in float32.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from services.inference.engine import avx2, avx512, cpu_kernels
from services.inference.engine.families import (
    FAST_MODEL_TYPES,
    Layer,
    UnsupportedModelError,
    Weight,
    attention_span,
    bias,
    cat_bias,
    check_fast_path,
    gate_up_modules,
    head_norms,
    qkv_modules,
)
from services.inference.engine.gguf_blocks import GgufInt4
from services.inference.engine.kv_cache import (
    CAPACITY_STEP,
    Chunks,
    DecodeBatch,
    ForwardSteps,
    KVCache,
    SlotCache,
)
from services.inference.engine.quant import (
    Int4Vnni,
    Int8Vnni,
    Int8Weight,
    QuantWeight,
    check_quantizable,
    for_kernels,
    int4_from_blocks,
    quantize_for,
    quantize_int8,
)

__all__ = [
    "CAPACITY_STEP",
    "FAST_MODEL_TYPES",
    "DecodeBatch",
    "KVCache",
    "Runner",
    "UnsupportedModelError",
    "packs_weights",
]


def packs_weights(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the runner keeps its projection weights in oneDNN's packed layout.

    A bf16 matmul on CPU goes through oneDNN, which otherwise reorders the weight into
    its blocked layout on every call: packing once made a decode step's matmuls 1.36x
    faster at 64 sequences and 1.9x at one (2-core EPYC with AVX-512 BF16), with
    bit-identical results. float32 stays on MKL's plain path, whose rounding the
    greedy-equality tests pin against transformers. oneDNN packs bf16 only on CPUs
    with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: elsewhere (an AVX2 EPYC) packing
    raised, so a bf16 model there keeps its plain weights.
    """
    if device.type != "cpu" or dtype is not torch.bfloat16 or avx512.serves():
        # Where avx512.py serves bf16 the runner packs for it instead (`Runner.pairs`).
        return False
    mkldnn: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return mkldnn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def attention_kernels(
    dtype: torch.dtype, device: torch.device, group: int, head_dim: int
) -> ModuleType | None:
    """The kernel module (avx512 or avx2) whose `decode_attention` runs a decode step's
    attention, one call per layer, or None for SDPA.

    SDPA's fixed cost dominated at decode shapes. The AVX2 kernel (float32 or bf16)
    measured 1.25-1.4x SDPA at 1-64 rows on an AVX2 EPYC (37 against 50 us at one);
    on a Zen 5 in bf16 (the demo model's shapes, 174 positions) 28 against 88 us at
    one row, 0.67 against 4.7 ms at 64; the AVX-512 one there 2.2-2.6x the AVX2 one
    (12 us at one row, 0.40 ms at 64).
    """
    if device.type != "cpu":
        return None
    if (
        dtype is torch.bfloat16
        and head_dim % 32 == 0
        and head_dim <= avx512.ATTENTION_MAX_DIM
        and group <= avx512.ATTENTION_MAX_GROUP
        and avx512.available()
    ):
        return avx512
    if dtype in (torch.float32, torch.bfloat16) and head_dim % 8 == 0 and avx2.available():
        return avx2
    return None


def _packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


def _plain_linear(
    x: torch.Tensor, weight: torch.Tensor | avx512.PairWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(weight, avx512.PairWeight):
        return weight.linear(x, bias)
    # float32 at a few rows: avx2.py's matrix-vector product where it runs (2-core
    # EPYC, the demo model's float32 decode step: MKL read the weights at 5-7 GB/s).
    if (
        x.dtype is torch.float32
        and x.shape[0] <= avx2.DENSE_ROWS
        and weight.shape[1] % 16 == 0
        and weight.is_contiguous()
        and avx2.available()
    ):
        out = avx2.dense_linear(x, weight)
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def _quant_linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return weight.linear(x, bias)


def _release(modules: list[Any], keep: torch.Tensor | None) -> int:
    """Free the weights of `modules` (all but `keep`); returns the bytes freed."""
    released = 0
    for module in modules:
        weight = module.weight
        if weight is keep:  # a tied output head is the embedding the runner reads
            continue
        released += weight.numel() * weight.element_size()
        weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
    # glibc keeps freed heap memory for reuse; hand it back (demo model, bf16: the
    # worker's RSS went from 965 to 764 MiB with the trim, and stayed without it).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return released


class Runner(ForwardSteps):
    """Prefill and decode forward passes over a `KVCache`, returning logits.

    Logits come in the model's dtype; `sampling.sample` widens the rows it needs.
    """

    def __init__(
        self,
        model: Any,
        *,
        pack_weights: bool | None = None,
        take_weights: bool = False,
        quantize: str = "none",
        gguf: Path | None = None,
    ) -> None:
        """`pack_weights`: None packs where `packs_weights` says it pays (or, where
        avx512.py serves bf16, into its pair layout); False keeps plain weights.

        `take_weights` frees the model's own copies of the weights the runner keeps
        in another form (fused QKV and gate/up, packed, quantised), about as much
        memory again as the model; the model can then no longer run by itself.
        `quantize`: "none", or "int8"/"int4" weight-only (quant.py; the output head
        and embedding are int8 in both). `gguf`: the file the model was loaded from;
        with int4, its Q4_0/Q4_1 projections keep the file's codes (gguf_blocks.py).
        """
        config = model.config
        check_fast_path(config)
        inner = model.model
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.groups = self.n_heads // self.n_kv_heads
        self.eps = float(config.rms_norm_eps)
        self.scaling = self.head_dim**-0.5
        self.context_length = attention_span(config)
        first = inner.embed_tokens.weight
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.vocab_size = int(model.lm_head.weight.shape[0])
        self.path = "fast"
        self.supports_prefix_cache = True
        self.whole_prompts = False
        check_quantizable(quantize, self.device, self.dtype)
        self.quantization = quantize
        quantized = quantize != "none"
        self.packed = not quantized and (
            packs_weights(self.dtype, self.device) if pack_weights is None else pack_weights
        )
        # Where avx512.py serves bf16 layers, weights in its own pair layout instead.
        self.pairs = (
            not quantized
            and pack_weights is None
            and self.device.type == "cpu"
            and self.dtype is torch.bfloat16
            and avx512.serves()
        )
        linear = _quant_linear if quantized else _packed_linear if self.packed else _plain_linear
        self._linear: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor] = linear
        self._copied: list[Any] = []  # modules whose weights the runner holds copies of
        # int4 codes straight from the file, while the layers are built.
        self._gguf = GgufInt4(gguf, model) if quantize == "int4" and gguf is not None else None
        self.from_file = 0  # projections whose int4 codes are the GGUF file's
        with torch.no_grad():
            self.embed: torch.Tensor | Int8Weight | Int8Vnni = inner.embed_tokens.weight.detach()
            self.norm = inner.norm.weight.detach()
            if quantized:
                head = quantize_for(model.lm_head.weight, "int8", self.dtype)
                assert isinstance(head, (Int8Weight, Int8Vnni))
                self.lm_head: Weight = head
                tied = model.lm_head.weight is inner.embed_tokens.weight
                self.embed = head if tied else quantize_int8(self.embed)
                self._copied += [model.lm_head] if tied else [model.lm_head, inner.embed_tokens]
            else:
                self.lm_head = self._weight(model.lm_head)
            self.layers = [self._layer(layer) for layer in inner.layers]
            positions = torch.arange(self.context_length, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
        self._gguf = None  # the file's reader: only needed while building
        keep = None if quantized else inner.embed_tokens.weight
        self.released_bytes = _release(self._copied, keep) if take_weights else 0
        # One call per RMSNorm and per rotary (csrc/cpu_ops.cpp) instead of PyTorch's
        # eight and five ops.
        self._fused_ops = self.device.type == "cpu" and cpu_kernels.OPS.available()
        # A decode step's attention in one call per layer (`attention_kernels`).
        self._attention = attention_kernels(self.dtype, self.device, self.groups, self.head_dim)
        self.rotary_dim = int(cos.shape[-1])  # less than head_dim: partial rotary (Phi-4-mini)
        half = self.rotary_dim // 2
        sign = torch.ones(self.rotary_dim, dtype=sin.dtype, device=self.device)
        sign[:half] = -1
        # rotate_half(x) * sin == roll(x, half) * (sign * sin): one op fewer per layer.
        self.cos = cos[0].contiguous()
        self.sin_signed = (sin[0] * sign).contiguous()
        self._stack = self._layer_stack()

    def _layer_stack(self) -> avx512.LayerStack | None:
        """The layers for `avx512.decode_layers` (a decode step's layers in one call),
        where it runs them: AVX-512 attention and fused ops, every projection in a
        layout of its own kernels, no biases and no per-head norms."""
        if self._attention is not avx512 or not self._fused_ops:
            return None
        weights: list[torch.Tensor] = []
        kinds: list[int] = []
        for layer in self.layers:
            projections = [layer.w_qkv, layer.w_o, layer.w_gate_up, layer.w_down]
            biases = [layer.b_qkv, layer.b_o, layer.b_gate_up, layer.b_down, layer.q_norm]
            if any(b is not None for b in biases):
                return None
            packed: list[torch.Tensor] = []
            for weight in projections:
                if not isinstance(weight, (avx512.PairWeight, Int8Vnni, Int4Vnni)):
                    return None
                packed.append(weight.packed)
                kinds.append(weight.kind)
            qkv, o, gate_up, down = packed
            weights += [layer.ln1, qkv, o, layer.ln2, gate_up, down]
        return avx512.LayerStack(weights, kinds)

    def _layer(self, layer: Any) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = qkv_modules(layer), gate_up_modules(layer)
        q_norm, k_norm = head_norms(layer)
        return Layer(
            ln1=layer.input_layernorm.weight.detach(),
            ln2=layer.post_attention_layernorm.weight.detach(),
            w_qkv=self._weight(*qkv),
            b_qkv=cat_bias(*qkv),
            w_o=self._weight(attn.o_proj),
            b_o=bias(attn.o_proj),
            w_gate_up=self._weight(*gate_up),
            b_gate_up=cat_bias(*gate_up),
            w_down=self._weight(mlp.down_proj),
            b_down=bias(mlp.down_proj),
            q_norm=q_norm,
            k_norm=k_norm,
        )

    def _weight(self, *modules: Any) -> Weight:
        """The modules' weights as the runner uses them: fused if several, packed if
        `packed` (or in avx512.py's pair layout, `pairs`), quantised if asked. A copy
        is recorded in `_copied`; a lone unpacked weight is used as is."""
        if self._gguf is not None:
            parts = [self._gguf.blocks(m) for m in modules]
            blocks = [p for p in parts if p is not None]
            if len(blocks) == len(modules):
                self._copied += modules
                self.from_file += len(blocks)
                return for_kernels(int4_from_blocks(blocks, self.dtype), self.dtype)
        weights = [m.weight.detach() for m in modules]
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        if self.quantization != "none":
            self._copied += modules
            return quantize_for(weight, self.quantization, self.dtype)
        if self.pairs and avx512.fits((weight.shape[0], weight.shape[1])):
            self._copied += modules
            return avx512.pack(weight)
        if self.packed:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        if self.packed or len(weights) > 1:
            self._copied += modules
        return weight

    def weight_bytes(self) -> int:
        """Bytes of the weights the runner reads (projections, head, embedding, norms)."""
        seen: set[int] = set()
        total = 0
        held: list[Any] = [self.embed, self.lm_head, self.norm]
        for layer in self.layers:
            held += [getattr(layer, f.name) for f in dataclasses.fields(layer)]
        for item in held:
            if item is None or id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, torch.Tensor):
                # A packed bf16 weight is an opaque mkldnn tensor: count its elements.
                total += item.numel() * item.element_size()
            else:
                total += item.nbytes
        return total

    def kv_bytes_per_position(self) -> int:
        """Key and value bytes one sequence position takes in the cache, all layers."""
        element = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * element

    def new_cache(
        self, slots: int, capacity: int = CAPACITY_STEP, *, held: int | None = None
    ) -> KVCache:
        """An empty cache for `slots` sequences, `held` of them usable now (default all)."""
        shape = (
            self.n_layers,
            slots,
            self.n_kv_heads,
            min(capacity, self.context_length),
            self.head_dim,
        )
        return KVCache(shape, self.dtype, self.device, held=held)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same as transformers' LlamaRMSNorm: normalise in float32, scale in model dtype.
        if self._fused_ops and x.dim() == 2 and x.is_contiguous():
            out: torch.Tensor = torch.ops.tokenyard_ops.rms_norm(x, weight, self.eps)
            return out
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return weight * normed.to(x.dtype)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x += delta`` (x is the step's own residual stream), then `x` normalised."""
        if self._fused_ops and delta.is_contiguous():
            out: torch.Tensor = torch.ops.tokenyard_ops.add_rms_norm_(x, delta, weight, self.eps)
            return out
        return self._rms_norm(x.add_(delta), weight)

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self._fused_ops:
            out: torch.Tensor = torch.ops.tokenyard_ops.rope(qk, cos, sin)
            return out
        rd = self.rotary_dim
        if rd == self.head_dim:
            return qk * cos + torch.roll(qk, rd // 2, -1) * sin
        rot = qk[..., :rd]
        return torch.cat([rot * cos + torch.roll(rot, rd // 2, -1) * sin, qk[..., rd:]], dim=-1)

    def _head_norms(self, qk: torch.Tensor, layer: Layer) -> torch.Tensor:
        """Qwen3's RMSNorm on each query and key head (before rotary)."""
        if layer.q_norm is None or layer.k_norm is None:
            return qk
        nh = self.n_heads
        q = self._rms_norm(qk[:, :nh], layer.q_norm)
        return torch.cat([q, self._rms_norm(qk[:, nh:], layer.k_norm)], dim=1)

    def _mlp(self, h: torch.Tensor, layer: Layer) -> torch.Tensor:
        gate, up = self._linear(h, layer.w_gate_up, layer.b_gate_up).chunk(2, dim=-1)
        return self._linear(F.silu(gate) * up, layer.w_down, layer.b_down)

    def _layer_loop(
        self,
        x: torch.Tensor,
        cache: KVCache,
        decode: DecodeBatch | None,
        meta: list[tuple[int, int, int, int, torch.Tensor]],
        *,
        rotary: tuple[torch.Tensor, torch.Tensor],
        lengths: torch.Tensor | None,
        decode_mask: torch.Tensor | None,
        fused_write: bool,
    ) -> None:
        """`forward`'s decoder layers from Python, op by op, over the residual stream `x`
        (updated in place): `meta` the prompt chunks' (slot, offset, start, end, mask),
        `lengths` or `decode_mask` what the decode rows attend to, `fused_write`
        whether rotary and the cache writes take `tokenyard_ops.rope_write_`."""
        nh, nkv, hd, g = self.n_heads, self.n_kv_heads, self.head_dim, self.groups
        cos, sin = rotary
        total = int(x.shape[0])
        b = length = 0
        if decode is not None:
            b, length = int(decode.tokens.shape[0]), int(decode.mask.shape[-1])
        h = self._rms_norm(x, self.layers[0].ln1)
        for i, layer in enumerate(self.layers):
            fused_qkv = self._linear(h, layer.w_qkv, layer.b_qkv)
            outs: list[torch.Tensor] = []
            if fused_write and decode is not None:
                q = torch.ops.tokenyard_ops.rope_write_(
                    fused_qkv, cos, sin, cache.k[i], cache.v[i], decode.write_index, nh, nkv
                )
                queries = q.view(b, nkv, g, hd)
            elif decode is not None:
                qkv = fused_qkv.view(total, nh + 2 * nkv, hd)
                qk = self._rope(self._head_norms(qkv[:, : nh + nkv], layer), cos, sin)
                # Written before the chunks: a prompt slot riding along in the decode
                # batch scribbles on the position its chunk then overwrites.
                cache.k[i].view(-1, hd).index_copy_(
                    0, decode.write_index, qk[:b, nh:].reshape(-1, hd)
                )
                cache.v[i].view(-1, hd).index_copy_(
                    0, decode.write_index, qkv[:b, nh + nkv :].reshape(-1, hd)
                )
                # Query heads grouped under their kv head: (b, kv heads, group, head_dim)
                # against the cache slots' keys in place (a strided view, no copy).
                queries = qk[:b, :nh].reshape(b, nkv, g, hd)
            else:
                qkv = fused_qkv.view(total, nh + 2 * nkv, hd)
                qk = self._rope(self._head_norms(qkv[:, : nh + nkv], layer), cos, sin)
            if decode is not None:
                if self._attention is not None and lengths is not None:
                    outs.append(
                        self._attention.decode_attention(
                            queries, cache.k[i], cache.v[i], lengths, self.scaling
                        )
                    )
                else:
                    # SDPA's fused CPU kernel against bmm, softmax, bmm (bf16, 2 cores): a
                    # quarter to 0.4x of the time at 1-64 rows over 128 positions alone,
                    # a 64-row step over 129 positions 67.9 against 72.8 ms.
                    attn = F.scaled_dot_product_attention(
                        queries,
                        cache.k[i, :b, :, :length],
                        cache.v[i, :b, :, :length],
                        attn_mask=decode_mask,
                        scale=self.scaling,
                    )
                    outs.append(attn.reshape(b, nh * hd))
            for slot, off, start, end, mask in meta:
                n = end - start
                cache.k[i, slot, :, start:end] = qk[off : off + n, nh:].transpose(0, 1)
                cache.v[i, slot, :, start:end] = qkv[off : off + n, nh + nkv :].transpose(0, 1)
                attn = F.scaled_dot_product_attention(
                    qk[off : off + n, :nh].transpose(0, 1)[None],
                    cache.k[i, slot : slot + 1, :, :end],
                    cache.v[i, slot : slot + 1, :, :end],
                    attn_mask=mask,
                    scale=self.scaling,
                    enable_gqa=True,
                )
                outs.append(attn[0].transpose(0, 1).reshape(n, nh * hd))
            merged = torch.cat(outs) if len(outs) > 1 else outs[0]
            h = self._add_norm(x, self._linear(merged, layer.w_o, layer.b_o), layer.ln2)
            down = self._mlp(h, layer)
            if i + 1 < len(self.layers):
                h = self._add_norm(x, down, self.layers[i + 1].ln1)
            else:
                x.add_(down)

    def write_rows(self, cache: SlotCache, write_pos: torch.Tensor) -> torch.Tensor:
        """Flat row indices in a layer's ``[slots*kv_heads*capacity, head_dim]`` view."""
        b = write_pos.shape[0]
        heads = torch.arange(self.n_kv_heads, device=self.device)
        slots = torch.arange(b, device=self.device)
        rows = (slots[:, None] * self.n_kv_heads + heads[None]) * cache.capacity
        return (rows + write_pos[:, None]).reshape(-1)

    @torch.inference_mode()
    def forward(
        self,
        cache: SlotCache,
        decode: DecodeBatch | None,
        chunks: Chunks,
    ) -> torch.Tensor:
        """One pass over a decode batch and prompt chunks together; returns logits.

        Every token shares the projections and MLP (one matmul per weight, so a step
        reads the weights once however its work is split); attention runs batched
        for the decode rows and per chunk for prompts. A chunk ``(slot, tokens,
        start)`` needs positions before `start` cached already. Returns the logits
        of ``decode.rows`` followed by those of each chunk's last token.
        """
        assert isinstance(cache, KVCache), "the fast path runs over its own KVCache"
        nh, nkv = self.n_heads, self.n_kv_heads
        device = self.device
        tokens: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        b = length = 0
        lengths: torch.Tensor | None = None  # positions each decode row attends to
        decode_mask: torch.Tensor | None = None
        if decode is not None:
            b, length = int(decode.tokens.shape[0]), int(decode.mask.shape[-1])
            if self._attention is not None:
                lengths = decode.positions + 1  # the mask is that prefix (DecodeBatch)
            else:
                # Additive, once per step: given the boolean mask, SDPA converts it in
                # every layer (same result, bit for bit).
                decode_mask = torch.zeros((b, 1, 1, length), dtype=self.dtype, device=device)
                decode_mask.masked_fill_(~decode.mask.reshape(b, 1, 1, length), float("-inf"))
            tokens.append(decode.tokens)
            positions.append(decode.positions)
        meta: list[tuple[int, int, int, int, torch.Tensor]] = []
        offset = b
        for slot, chunk, start in chunks:
            n = int(chunk.shape[0])
            end = start + n
            rows = torch.arange(start, end, device=device)
            mask = (torch.arange(end, device=device)[None] <= rows[:, None])[None, None]
            meta.append((slot, offset, start, end, mask))
            tokens.append(chunk)
            positions.append(rows)
            offset += n
        flat = torch.cat(tokens) if len(tokens) > 1 else tokens[0]
        pos = torch.cat(positions) if len(positions) > 1 else positions[0]
        x = (
            F.embedding(flat, self.embed)
            if isinstance(self.embed, torch.Tensor)
            else self.embed.rows(flat)
        )
        cos, sin = self.cos[pos], self.sin_signed[pos]
        if not self._fused_ops:  # broadcast over the heads
            cos, sin = cos[:, None], sin[:, None]
        # A decode step alone (no prompt chunks, no per-head norms): rotary and the
        # cache writes in one call per layer (`tokenyard_ops.rope_write_`), or every
        # layer in one call where `avx512.decode_layers` runs them.
        fused_write = (
            self._fused_ops and decode is not None and not meta and self.layers[0].q_norm is None
        )
        if fused_write and self._stack is not None and decode is not None and lengths is not None:
            x = avx512.decode_layers(
                x,
                self._stack,
                rotary=(cos, sin),
                cache=(cache.k, cache.v),
                rows=decode.write_index,
                lengths=lengths,
                shape=(nh, nkv, self.scaling, self.eps),
            )
        else:
            self._layer_loop(
                x,
                cache,
                decode,
                meta,
                rotary=(cos, sin),
                lengths=lengths,
                decode_mask=decode_mask,
                fused_write=fused_write,
            )
        last = torch.tensor(
            [off + (end - start) - 1 for _, off, start, end, _ in meta],
            dtype=torch.long,
            device=device,
        )
        wanted = last if decode is None else torch.cat([decode.rows, last])
        x = self._rms_norm(x.index_select(0, wanted), self.norm)
        # In the model's dtype: a float32 copy of 64 x 49152 logits costs ~4 ms a
        # step on the 2-core CPU, and greedy rows are chosen exactly without it.
        return self._linear(x, self.lm_head, None)
