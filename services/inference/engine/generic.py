"""The generic path: any transformers causal LM, run by transformers itself.

Models the fast path does not implement (GPT-2, OPT, Gemma, Phi-1/2, models with
dynamic rotary scaling...) are served by calling the model's own forward with its
own cache, one sequence at a time: each sequence keeps a transformers
`DynamicCache`, built from the model's config as `generate` builds it, in its slot.
Every step computes the same calls `generate` makes for that sequence alone, so the
output is what transformers gives, at batch one's speed. The scheduler, sampling,
streaming, cancellation and limits are the engine's, as on the fast path; prompts
are prefilled whole, never in chunks (see `whole_prompts`). The prefix
cache is off here: a transformers cache can hold more than keys and values per
position (sliding windows, recurrent state), so its blocks cannot be copied safely.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from services.inference.engine.families import UnsupportedModelError
from services.inference.engine.kv_cache import (
    CAPACITY_STEP,
    Chunks,
    DecodeBatch,
    ForwardSteps,
    SlotCache,
)
from services.inference.engine.quant import QuantizationError
from services.inference.engine.runner import Runner

log = logging.getLogger(__name__)


class GenericCache:
    """One transformers cache per slot (None while the slot is empty)."""

    def __init__(self, slots: int, capacity: int) -> None:
        self.slots = slots
        self.entries: list[Any | None] = [None] * slots
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        """Positions the scheduler has asked room for (each entry grows by itself)."""
        return self._capacity

    def nbytes(self) -> int:
        """Bytes of the key and value tensors every entry holds."""
        total = 0
        for entry in self.entries:
            for layer in getattr(entry, "layers", ()):
                for name in ("keys", "values"):
                    tensor = getattr(layer, name, None)
                    if isinstance(tensor, torch.Tensor):
                        total += tensor.numel() * tensor.element_size()
        return total

    def ensure_capacity(self, needed: int, limit: int) -> None:
        """Record the room asked for; transformers caches grow as they are written."""
        self._capacity = max(self._capacity, min(needed, limit))

    def ensure_slots(self, count: int) -> None:
        """Nothing to do: every slot's entry is made when its sequence first runs."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Hand slot `src`'s cache (exactly `length` positions) to slot `dst`."""
        self.entries[dst], self.entries[src] = self.entries[src], None

    def read(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Not on this path: the engine keeps the prefix cache off (module docstring)."""
        raise NotImplementedError("the generic path has no prefix cache")

    def write(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Not on this path: the engine keeps the prefix cache off (module docstring)."""
        raise NotImplementedError("the generic path has no prefix cache")


class GenericRunner(ForwardSteps):
    """Runs a transformers causal LM's own forward pass, one sequence per call."""

    path = "generic"
    supports_prefix_cache = False
    # A prompt split into chunks can change the result: rotary types that pick their
    # frequencies from the longest position in a call (longrope, dynamic NTK) would
    # encode a long prompt's first chunk unlike `generate`, which sees it whole.
    whole_prompts = True
    packed = False
    released_bytes = 0
    quantization = "none"
    from_file = 0  # projections keeping a GGUF's int4 codes (the fast path's)

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config.get_text_config(decoder=True)
        first = next(model.parameters())
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        positions = getattr(self.config, "max_position_embeddings", None)
        self.context_length = int(positions) if isinstance(positions, int) else 2**31 - 1

    def weight_bytes(self) -> int:
        """Bytes of the model's parameters (transformers holds and reads them)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def new_cache(
        self, slots: int, capacity: int = CAPACITY_STEP, *, held: int | None = None
    ) -> GenericCache:
        """Empty slots for `slots` sequences (an entry costs nothing until used: `held`
        changes nothing)."""
        return GenericCache(slots, min(capacity, self.context_length))

    def kv_bytes_per_position(self) -> int:
        """Keys and values of one position, from the config (an estimate for odd models)."""
        c = self.config
        heads = int(getattr(c, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(c, "head_dim", None) or int(c.hidden_size) // heads)
        element = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * int(c.num_hidden_layers) * kv_heads * head_dim * element

    def write_rows(self, cache: SlotCache, write_pos: torch.Tensor) -> torch.Tensor:
        """Unused here: each sequence's cache takes its own new positions."""
        return write_pos

    @torch.inference_mode()
    def forward(self, cache: SlotCache, decode: DecodeBatch | None, chunks: Chunks) -> torch.Tensor:
        """Logits of ``decode.rows``' next tokens, then of each chunk's last token."""
        assert isinstance(cache, GenericCache), "the generic path runs over a GenericCache"
        logits: list[torch.Tensor] = []
        if decode is not None:
            for row in decode.rows.tolist():
                start = int(decode.positions[row])
                logits.append(self._run(cache, row, decode.tokens[row : row + 1], start))
        for slot, tokens, start in chunks:
            logits.append(self._run(cache, slot, tokens, start))
        return torch.cat(logits)

    def _run(
        self, cache: GenericCache, slot: int, tokens: torch.Tensor, start: int
    ) -> torch.Tensor:
        from transformers import DynamicCache

        entry = cache.entries[slot]
        if start == 0 or entry is None:
            if start:
                raise RuntimeError(f"slot {slot} has no cache for position {start}")
            entry = DynamicCache(config=self.model.config)
            cache.entries[slot] = entry
        elif entry.get_seq_length() != start:
            raise RuntimeError(f"slot {slot} holds {entry.get_seq_length()} positions, not {start}")
        out = self.model(input_ids=tokens[None], cache=entry, use_cache=True, logits_to_keep=1)
        result: torch.Tensor = out.logits[0, -1:]
        return result


def select_runner(
    model: Any, *, take_weights: bool = False, quantize: str = "none", gguf: Path | None = None
) -> Runner | GenericRunner:
    """The fast path where it implements the model's family, the generic path otherwise.

    Quantisation (`quantize` int8/int4) is the fast path's: a model that runs generic
    is refused with `QuantizationError` rather than served unquantised. `gguf`: the
    file the model came from, whose 4-bit blocks int4 keeps (see `Runner`).
    """
    name = getattr(model.config, "model_type", "?")
    try:
        runner: Runner | GenericRunner = Runner(
            model, take_weights=take_weights, quantize=quantize, gguf=gguf
        )
    except UnsupportedModelError as exc:
        if quantize != "none":
            raise QuantizationError(
                f"--quantize {quantize}: model type {name} runs on the generic path "
                f"({exc}), which serves unquantised weights only"
            ) from exc
        log.info("model type %s: generic transformers path (%s)", name, exc)
        return GenericRunner(model)
    log.info("model type %s: fast path", name)
    return runner
