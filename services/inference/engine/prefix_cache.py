"""Reuse of already-computed key/value blocks for shared prompt prefixes.

Token sequences are cut into fixed-size blocks; a block is keyed by a hash chained
over every token before it, so a key names a whole prefix. Blocks live in an LRU
under a byte budget. A chain is touched from its last block to its first, so the
first blocks of a prefix are the most recently used and eviction trims chains from
the tail, never leaving an unreachable middle.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class _Block:
    parent: int | None
    tokens: tuple[int, ...]
    k: torch.Tensor  # [layers, kv_heads, block_size, head_dim]
    v: torch.Tensor
    nbytes: int


def _chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class PrefixCache:
    """An LRU of key/value blocks keyed by chained prefix hashes."""

    def __init__(self, block_size: int, max_bytes: int) -> None:
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[int, _Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def _keys(
        self, tokens: Sequence[int], limit: int
    ) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(key, parent, block tokens) for each full block within tokens[:limit]."""
        out: list[tuple[int, int | None, tuple[int, ...]]] = []
        parent: int | None = None
        bs = self.block_size
        for start in range(0, limit - bs + 1, bs):
            block = tuple(tokens[start : start + bs])
            key = _chain_hash(parent, block)
            out.append((key, parent, block))
            parent = key
        return out

    def lookup(
        self, tokens: Sequence[int], limit: int
    ) -> tuple[int, list[torch.Tensor], list[torch.Tensor]]:
        """Longest cached prefix of tokens[:limit]: (length, key blocks, value blocks)."""
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        found: list[int] = []
        for key, parent, block in self._keys(tokens, limit):
            entry = self._blocks.get(key)
            if entry is None or entry.parent != parent or entry.tokens != block:
                break
            found.append(key)
            ks.append(entry.k)
            vs.append(entry.v)
        for key in reversed(found):
            self._blocks.move_to_end(key)
        return len(found) * self.block_size, ks, vs

    def missing(self, tokens: Sequence[int], limit: int) -> tuple[int, int]:
        """Positions [start, end) of tokens[:limit] whose full blocks are not cached yet."""
        keys = self._keys(tokens, limit)
        start = 0
        for key, _, _ in keys:
            if key not in self._blocks:
                break
            start += self.block_size
        return start, len(keys) * self.block_size

    def insert(self, tokens: Sequence[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add blocks for tokens[start:start+n] given their keys/values ``[L, H, n, D]``.

        `start` must be block-aligned and the blocks before it cached already.
        """
        bs = self.block_size
        end = start + k.shape[2]
        keys = self._keys(tokens, end)
        touched: list[int] = []
        for index, (key, parent, block) in enumerate(keys):
            touched.append(key)
            pos = index * bs
            if pos < start or key in self._blocks:
                continue
            kb = k[:, :, pos - start : pos - start + bs].clone()
            vb = v[:, :, pos - start : pos - start + bs].clone()
            nbytes = 2 * kb.numel() * kb.element_size()
            if nbytes > self.max_bytes:
                return
            self._blocks[key] = _Block(parent, block, kb, vb, nbytes)
            self.nbytes += nbytes
        for key in reversed(touched):
            if key in self._blocks:
                self._blocks.move_to_end(key)
        self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.nbytes -= block.nbytes

    def clear(self) -> None:
        """Drop every block."""
        self._blocks.clear()
        self.nbytes = 0
