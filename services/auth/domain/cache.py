"""In-process cache of digest → principal, with short TTL and invalidation.

A generation counter closes the race where a revocation lands while a lookup
is in flight: an answer read before the revocation is not cached after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from services.auth.domain.principal import Principal

MAX_ENTRIES = 100_000


@dataclass
class _Entry:
    principal: Principal
    deadline: float


class PrincipalCache:
    """Digest-keyed principals; invalidated by credential id, user id, or wholesale."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, _Entry] = {}
        self.generation = 0

    def get(self, digest: str) -> Principal | None:
        """A fresh cached principal, or None."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry.deadline <= time.monotonic():
            self._entries.pop(digest, None)
            return None
        return entry.principal

    def put(self, digest: str, principal: Principal, generation: int) -> None:
        """Cache `principal` unless anything was invalidated since `generation`."""
        if self.ttl <= 0 or generation != self.generation:
            return
        deadline = time.monotonic() + self.ttl
        if principal.expire_time is not None:
            left = principal.expire_time.timestamp() - time.time()
            deadline = min(deadline, time.monotonic() + left)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
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
