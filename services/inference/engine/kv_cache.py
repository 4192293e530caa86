"""What the scheduler needs from a model path: a slot cache and a batched forward.

Two paths implement it: `runner.Runner`, the engine's own forward pass for the
families it knows, over `KVCache`; and `generic.GenericRunner`, which runs any
transformers causal LM itself over its own per-sequence cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

CAPACITY_STEP = 64  # cache capacities are multiples of this many positions


@dataclass(frozen=True)
class DecodeBatch:
    """One new token for each of cache slots ``0..B-1``.

    `positions` are rotary positions, `write_index` the flat cache rows (see
    `Runner.write_rows`) receiving the new keys/values, `mask` ``[B, 1, 1, L]`` which
    of the first L cached positions each row attends to (its positions up to
    ``positions[r]``: the fast path's own attention reads the lengths from there),
    and `rows` the rows whose logits are wanted (slots that ride along as no-ops are
    left out). L is the longest row's length: attention reads the cache in place, so
    shorter is cheaper.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    write_index: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor


class SlotCache(Protocol):
    """Keys and values for a fixed number of sequence slots."""

    @property
    def capacity(self) -> int:
        """Positions each slot can hold."""

    def nbytes(self) -> int:
        """Memory held by keys and values."""

    def ensure_capacity(self, needed: int, limit: int) -> None:
        """Grow every slot to hold at least `needed` positions (at most `limit`)."""

    def ensure_slots(self, count: int) -> None:
        """Make slots ``0..count-1`` usable (`count` at most the cache's slots)."""

    def move(self, src: int, dst: int, length: int) -> None:
        """Make slot `dst` hold the first `length` positions of slot `src`."""

    def read(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of positions [start, end) of `slot`: ``[layers, kv_heads, n, head_dim]``."""

    def write(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `k`/`v` (as returned by `read`) at positions from `start` of `slot`."""


Chunks = Sequence[tuple[int, torch.Tensor, int]]


class ModelRunner(Protocol):
    """A model path: batched prefill and decode over a `SlotCache`, returning logits."""

    path: str  # "fast" (the engine's own forward pass) or "generic" (transformers)
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    context_length: int
    supports_prefix_cache: bool
    # Prefill each prompt in one call: its output may depend on how it is split.
    whole_prompts: bool

    def new_cache(
        self, slots: int, capacity: int = CAPACITY_STEP, *, held: int | None = None
    ) -> SlotCache:
        """An empty cache for `slots` sequences, `held` of them usable now (default all;
        `ensure_slots` makes the rest usable)."""

    def kv_bytes_per_position(self) -> int:
        """Key and value bytes one sequence position takes in the cache, all layers."""

    def write_rows(self, cache: SlotCache, write_pos: torch.Tensor) -> torch.Tensor:
        """Where a decode batch's new keys/values go (see `DecodeBatch.write_index`)."""

    def forward(self, cache: SlotCache, decode: DecodeBatch | None, chunks: Chunks) -> torch.Tensor:
        """Logits of ``decode.rows`` then of each chunk ``(slot, tokens, start)``'s last token."""

    def prefill(self, cache: SlotCache, chunks: Chunks) -> torch.Tensor:
        """Prompt chunks only; returns ``[len(chunks), vocab]``."""

    def decode(
        self,
        cache: SlotCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        write_index: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each of slots ``0..B-1``; returns logits ``[B, vocab]``."""


MIN_KV_POSITIONS = 64


def kv_positions(runner: ModelRunner, max_running: int, budget_bytes: int) -> int:
    """Positions per sequence that a KV cache of `budget_bytes` holds for every slot.

    Each of the `max_running` slots may grow to the engine's context length, so the
    budget caps that length: the cache can never outgrow it, whatever the requests.
    Raises ValueError when the budget cannot hold even `MIN_KV_POSITIONS`.
    """
    per_position = runner.kv_bytes_per_position() * max_running
    positions = budget_bytes // per_position
    if positions < MIN_KV_POSITIONS:
        raise ValueError(
            f"a KV cache of {budget_bytes / 2**20:.1f} MiB holds {positions} positions per "
            f"sequence at max_running={max_running} ({per_position} bytes per position); "
            f"at least {MIN_KV_POSITIONS} are needed: give it more memory or lower max_running"
        )
    return int(positions)


class KVCache:
    """Keys and values per (layer, slot): ``[layers, slots, kv_heads, capacity, head_dim]``.

    Capacity grows when a sequence needs more positions, so memory follows the longest
    running sequence instead of the model's full context. It grows by a quarter (at
    least one `CAPACITY_STEP`) rather than doubling, so memory stays close to the
    length in use. The scheduler's cache holds slots as sequences take them (it fills
    them from 0 up), doubling up to `slots`: a growth copies the slots in use, not
    every slot the engine may run. One stream on a 64-slot engine (demo model, float32)
    had reallocated 2 x 188 MB at each growth, 4 ms a token over 128 tokens.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        held: int | None = None,
    ) -> None:
        """`held`: slots usable now (default all of ``shape[1]``)."""
        self.slots = shape[1]  # the most it holds
        now = (shape[0], min(shape[1] if held is None else held, shape[1]), *shape[2:])
        self.k = torch.zeros(now, dtype=dtype, device=device)
        self.v = torch.zeros(now, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        """Positions each slot can hold."""
        return int(self.k.shape[3])

    def nbytes(self) -> int:
        """Memory held by keys and values."""
        return 2 * self.k.numel() * self.k.element_size()

    def ensure_capacity(self, needed: int, limit: int) -> None:
        """Grow every slot to hold at least `needed` positions (at most `limit`)."""
        if needed <= self.capacity:
            return
        wanted = max(needed, self.capacity + self.capacity // 4)
        new_cap = -(-wanted // CAPACITY_STEP) * CAPACITY_STEP
        new_cap = max(min(new_cap, limit), needed)
        self._resize(int(self.k.shape[1]), new_cap)

    def ensure_slots(self, count: int) -> None:
        """Make slots ``0..count-1`` usable: hold twice as many (at most `slots`)."""
        held = int(self.k.shape[1])
        if count <= held:
            return
        if count > self.slots:
            raise ValueError(f"slot {count - 1} asked of a cache of {self.slots} slots")
        self._resize(min(self.slots, max(count, 2 * held)), self.capacity)

    def _resize(self, slots: int, capacity: int) -> None:
        """New tensors of `slots` x `capacity`, zeros but for what the old held."""
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(
                (old.shape[0], slots, old.shape[2], capacity, old.shape[4]),
                dtype=old.dtype,
                device=old.device,
            )
            new[:, : old.shape[1], :, : old.shape[3]] = old
            setattr(self, name, new)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def read(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of positions [start, end) of `slot`: ``[layers, kv_heads, n, head_dim]``."""
        return (
            self.k[:, slot, :, start:end].clone(),
            self.v[:, slot, :, start:end].clone(),
        )

    def write(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `k`/`v` (as returned by `read`) at positions from `start` of `slot`."""
        end = start + k.shape[2]
        self.k[:, slot, :, start:end] = k
        self.v[:, slot, :, start:end] = v


class ForwardSteps:
    """`decode` and `prefill` as calls of a runner's one `forward` (fast and generic)."""

    device: torch.device

    def forward(self, cache: SlotCache, decode: DecodeBatch | None, chunks: Chunks) -> torch.Tensor:
        """Logits of ``decode.rows`` then of each chunk ``(slot, tokens, start)``'s last token."""
        raise NotImplementedError

    def decode(
        self,
        cache: SlotCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        write_index: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each of slots ``0..B-1``; returns logits ``[B, vocab]``."""
        rows = torch.arange(tokens.shape[0], device=self.device)
        return self.forward(cache, DecodeBatch(tokens, positions, write_index, mask, rows), ())

    def prefill(self, cache: SlotCache, chunks: Chunks) -> torch.Tensor:
        """Prompt chunks ``(slot, tokens, start)`` only; returns ``[len(chunks), vocab]``."""
        return self.forward(cache, None, chunks)
