"""Routing policies: pure functions ordering candidate workers for one request.

Each policy returns every candidate, best first; the router tries them in that
order (failover walks down the list). They read only what they are given, so
they are unit-tested without any I/O.

- `least_load`: fewest queued + running sequences, weighted by pending tokens.
- `prefix_affinity` (the SGLang router's idea): prompts are cut into blocks whose
  chained hashes approximate a radix tree; the worker that last served the
  longest matching prefix goes first unless its load exceeds the least loaded
  worker's by more than a threshold.
- `affinity_key`: rendezvous (highest random weight) hashing on the key, so a
  key keeps its worker while the set of workers changes least.
- `round_robin`: a rotating start.

Whatever the policy, a sheddable request (negative `priority`) tries the workers
with a free slot first (`free_first`): a saturated worker would refuse it.
Fairness between users and priority order inside a worker are the worker's
queue's (the router stamps the user as the request's `tenant`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

# One pending token weighs this much of a sequence in least_load's score.
PENDING_TOKEN_WEIGHT = 1.0 / 4096


@dataclass(frozen=True, slots=True)
class Candidate:
    """What a policy knows of one healthy worker serving the model."""

    worker_id: str
    running: int = 0
    queued: int = 0
    pending_tokens: int = 0
    free_slots: int = 0  # running slots not taken (as last reported)

    @property
    def load(self) -> float:
        """Sequences ahead of a new request, plus a weight for tokens still to process."""
        return self.running + self.queued + self.pending_tokens * PENDING_TOKEN_WEIGHT


def least_load(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Least loaded first; ties broken by worker id for stable choices."""
    return sorted(candidates, key=lambda c: (c.load, c.worker_id))


def free_first(ordered: Sequence[Candidate]) -> list[Candidate]:
    """`ordered` with the workers that have a free slot first, each part in its order."""
    return [c for c in ordered if c.free_slots > 0] + [c for c in ordered if c.free_slots <= 0]


def round_robin(candidates: Sequence[Candidate], counter: int) -> list[Candidate]:
    """Start at `counter` modulo the candidates (sorted by id), then the rest in order."""
    ordered = sorted(candidates, key=lambda c: c.worker_id)
    if not ordered:
        return []
    start = counter % len(ordered)
    return ordered[start:] + ordered[:start]


def _score(key: str, worker_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def affinity_key(candidates: Sequence[Candidate], key: str) -> list[Candidate]:
    """Rendezvous hashing on `key`; an empty key falls back to least_load."""
    if not key:
        return least_load(candidates)
    return sorted(candidates, key=lambda c: _score(key, c.worker_id), reverse=True)


def prefix_blocks(text: str, block_chars: int, max_blocks: int = 64) -> list[bytes]:
    """Chained hashes of the prompt's whole blocks: entry i identifies blocks 0..i.

    Two prompts share entry i exactly when they share their first (i+1) blocks, so
    the list walks an implicit radix tree of prefixes without storing one.
    """
    out: list[bytes] = []
    previous = b""
    whole = min(len(text) // block_chars, max_blocks)
    for i in range(whole):
        block = text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=12).digest()
        out.append(previous)
    return out


class PrefixTable:
    """Bounded map from prefix-block hash to the worker that last served it (LRU)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._map: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def longest_match(self, blocks: Sequence[bytes], allowed: set[str]) -> tuple[str | None, int]:
        """The worker holding the longest prefix of `blocks` among `allowed`, and its length."""
        for i in range(len(blocks) - 1, -1, -1):
            worker = self._map.get(blocks[i])
            if worker is not None and worker in allowed:
                return worker, i + 1
        return None, 0

    def record(self, blocks: Sequence[bytes], worker_id: str) -> None:
        """Remember that `worker_id` now holds every prefix in `blocks`."""
        for block in blocks:
            self._map[block] = worker_id
            self._map.move_to_end(block)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)


def prefix_affinity(
    candidates: Sequence[Candidate],
    blocks: Sequence[bytes],
    table: PrefixTable,
    threshold: float,
) -> list[Candidate]:
    """The worker with the longest cached prefix first, unless overloaded; then least_load.

    Overloaded means its load exceeds the least loaded candidate's by more than
    `threshold`. The caller records the final choice with `PrefixTable.record`.
    """
    ordered = least_load(candidates)
    if not ordered or not blocks:
        return ordered
    worker, _ = table.longest_match(blocks, {c.worker_id for c in ordered})
    if worker is None:
        return ordered
    preferred = next(c for c in ordered if c.worker_id == worker)
    if preferred.load - ordered[0].load > threshold:
        return ordered
    return [preferred, *(c for c in ordered if c.worker_id != worker)]
