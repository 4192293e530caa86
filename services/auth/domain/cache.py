"""In-process cache of digest → principal, with short TTL and invalidation.

A generation counter closes the race where a revocation lands while a lookup
is in flight: an answer read before the revocation is not cached after it.
Entries live in a `cachetools.TLRUCache`: each expires at its own deadline (the
TTL, or sooner when the key expires) and the least recently used one makes room
when full, instead of the whole cache being dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachetools import TLRUCache

from services.auth.domain.principal import Principal

MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class _Entry:
    principal: Principal
    deadline: float


def _deadline(_key: str, entry: _Entry, _now: float) -> float:
    return entry.deadline


class PrincipalCache:
    """Digest-keyed principals; invalidated by credential id, user id, or wholesale."""

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self._clock, self._wall = clock, wall_clock
        self._entries: TLRUCache[str, _Entry] = TLRUCache(max_entries, _deadline, timer=clock)
        self.generation = 0

    def get(self, digest: str) -> Principal | None:
        """A fresh cached principal, or None."""
        entry = self._entries.get(digest)
        return None if entry is None else entry.principal

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Cache `principal` unless anything was invalidated since `generation`."""
        if self.ttl <= 0 or generation != self.generation:
            return
        now = self._clock()
        deadline = now + self.ttl
        if principal.expire_time is not None:
            deadline = min(deadline, now + principal.expire_time.timestamp() - self._wall())
        self._entries[digest] = _Entry(principal, deadline)

    def invalidate(self, credential_ids: Iterable[str] = (), user_ids: Iterable[str] = ()) -> None:
        """Drop entries for these credentials or users."""
        creds, users = set(credential_ids), set(user_ids)
        self.generation += 1
        if not creds and not users:
            return
        for digest, entry in list(self._entries.items()):
            p = entry.principal
            if p.credential_id in creds or p.user_id in users:
                self._entries.pop(digest, None)

    def clear(self) -> None:
        """Drop everything (a role changed)."""
        self.generation += 1
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
