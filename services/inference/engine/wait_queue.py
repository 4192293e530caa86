"""The engine's waiting queue: priority first, then tenants in turn, then arrival.

Inside one priority the queue serves tenants (the router's user id) round-robin,
one request each, not first-come: a tenant with 100 queued requests cannot starve
one with 1, and two backlogged tenants get slots at the same rate whatever their
submission rates. A tenant's own requests keep their arrival order; a preempted
sequence goes back to the front of its tenant's line, so it resumes before that
tenant's newer requests.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

from services.inference.engine.sequence import Sequence


class WaitQueue:
    """Waiting sequences, popped highest priority first, tenants round-robin inside one."""

    def __init__(self) -> None:
        # priority → tenant → that tenant's line; tenant order is the rotation.
        self._levels: dict[int, OrderedDict[str, deque[Sequence]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Sequence]:
        for priority in sorted(self._levels, reverse=True):
            for line in self._levels[priority].values():
                yield from line

    def push(self, seq: Sequence, *, front: bool = False) -> None:
        """Queue `seq` behind its tenant's others (`front`: ahead of them, a resume)."""
        level = self._levels.setdefault(seq.priority, OrderedDict())
        line = level.get(seq.tenant)
        if line is None:
            line = level[seq.tenant] = deque()
        if front:
            line.appendleft(seq)
        else:
            line.append(seq)
        self._size += 1

    def top_priority(self) -> int | None:
        """The highest priority waiting, or None when empty."""
        return max(self._levels) if self._levels else None

    def peek(self) -> Sequence:
        """The sequence `pop` returns next (the queue must not be empty)."""
        level = self._levels[max(self._levels)]
        return next(iter(level.values()))[0]

    def pop(self) -> Sequence:
        """The next sequence: highest priority, the tenant whose turn it is, its oldest."""
        priority = max(self._levels)
        level = self._levels[priority]
        tenant, line = next(iter(level.items()))
        seq = line.popleft()
        if line:
            level.move_to_end(tenant)  # served: the next tenant's turn
        else:
            del level[tenant]
            if not level:
                del self._levels[priority]
        self._size -= 1
        return seq

    def remove_if(self, gone: Callable[[Sequence], bool]) -> list[Sequence]:
        """Take out every sequence `gone` holds true for; returns them."""
        removed: list[Sequence] = []
        for priority in list(self._levels):
            level = self._levels[priority]
            for tenant in list(level):
                line = level[tenant]
                keep = deque(s for s in line if not gone(s))
                removed.extend(s for s in line if gone(s))
                if keep:
                    level[tenant] = keep
                else:
                    del level[tenant]
            if not level:
                del self._levels[priority]
        self._size -= len(removed)
        return removed
