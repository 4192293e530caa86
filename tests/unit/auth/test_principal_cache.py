"""The auth service's principal cache: per-entry deadlines, LRU room, invalidation."""

from __future__ import annotations

from datetime import UTC, datetime

from services.auth.domain.cache import PrincipalCache
from services.auth.domain.permissions import Limits
from services.auth.domain.principal import Principal


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


WALL = 1_800_000_000.0


def principal(credential: str, user: str = "u1", expires_in: float | None = None) -> Principal:
    expire = None if expires_in is None else datetime.fromtimestamp(WALL + expires_in, UTC)
    return Principal(user, user, credential, "api_key", frozenset(), (), Limits(), expire)


def make(clock: Clock, ttl: float = 10.0, max_entries: int = 100) -> PrincipalCache:
    return PrincipalCache(ttl, max_entries=max_entries, clock=clock, wall_clock=lambda: WALL)


def test_an_entry_lives_for_the_ttl_or_until_its_key_expires() -> None:
    clock = Clock()
    cache = make(clock)
    cache.put("a", principal("k1"), cache.generation)
    cache.put("b", principal("k2", expires_in=3.0), cache.generation)
    clock.now += 2.9
    assert cache.get("a") is not None and cache.get("b") is not None
    clock.now += 0.2  # past the key's own expiry, within the TTL
    assert cache.get("a") is not None and cache.get("b") is None
    clock.now += 7.0
    assert cache.get("a") is None


def test_a_full_cache_makes_room_for_one_entry_without_dropping_the_rest() -> None:
    clock = Clock()
    cache = make(clock, max_entries=3)
    for name in ("a", "b", "c"):
        cache.put(name, principal(name), cache.generation)
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", principal("d"), cache.generation)
    assert len(cache) == 3
    assert cache.get("b") is None  # the least recently used went
    assert all(cache.get(n) is not None for n in ("a", "c", "d"))


def test_an_answer_read_before_an_invalidation_is_not_cached_after_it() -> None:
    cache = make(Clock())
    generation = cache.generation
    cache.invalidate(credential_ids=["k1"])
    cache.put("a", principal("k1"), generation)
    assert cache.get("a") is None


def test_invalidation_by_credential_by_user_and_wholesale() -> None:
    cache = make(Clock())
    cache.put("a", principal("k1", "u1"), cache.generation)
    cache.put("b", principal("k2", "u1"), cache.generation)
    cache.put("c", principal("k3", "u2"), cache.generation)
    cache.invalidate(credential_ids=["k1"])
    assert cache.get("a") is None and cache.get("b") is not None
    cache.invalidate(user_ids=["u1"])
    assert cache.get("b") is None and cache.get("c") is not None
    cache.clear()
    assert cache.get("c") is None
