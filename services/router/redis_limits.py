"""Limits shared by router replicas, counted in Redis with atomic Lua scripts.

Keys (one hash tag per credential, so a Redis Cluster keeps them on one shard):
`<prefix>{<credential>}:rpm:<minute>` and `:tpm:<minute>` are fixed-window
counters that expire after two minutes; `:slots` is a sorted set of the
credential's running streams scored by lease expiry. A router renews the
leases of its streams every third of the lease, so a crashed router's slots
expire on their own instead of leaking.

When Redis is down: each replica falls back to in-process limits (so the
effective limit is per replica for the outage), logs the outage once and its
end once, and retries Redis after a second. Generation keeps working. Requests
admitted locally are settled locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.router import metrics
from services.router.limits import (
    WINDOW,
    LimitSpec,
    LocalLimits,
    Slot,
    concurrency_exceeded,
    rpm_exceeded,
    tpm_exceeded,
)

log = logging.getLogger("tokenyard.router.limits")

# Returns {0} admitted, {1} rpm, {2} tpm, {3} concurrency.
ADMIT = """
local now_ms = tonumber(ARGV[4])
local tpm = tonumber(ARGV[2])
if tpm >= 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpm then return 2 end
local conc = tonumber(ARGV[3])
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) >= conc then return 3 end
end
local rpm = tonumber(ARGV[1])
if rpm >= 0 then
  local n = redis.call('INCR', KEYS[1])
  if n == 1 then redis.call('PEXPIRE', KEYS[1], 120000) end
  if n > rpm then redis.call('DECR', KEYS[1]) return 1 end
end
if conc >= 0 then
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[5]), ARGV[6])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[5]))
end
return 0
"""

# Frees a slot and counts tokens: KEYS slots, tpm; ARGV member, tokens.
SETTLE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  redis.call('INCRBY', KEYS[2], tokens)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
return 0
"""

RETRY_AFTER_OUTAGE = 1.0


class _RedisSlot:
    __slots__ = ("limits", "member", "released", "spec")

    def __init__(self, limits: RedisLimits, spec: LimitSpec, member: str) -> None:
        self.limits, self.spec, self.member, self.released = limits, spec, member, False

    async def settle(self, tokens: int) -> None:
        if not self.released:
            self.released = True
            await self.limits.release(self, tokens)


class RedisLimits:
    """Limits in Redis, falling back to in-process counting while Redis is down."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "tokenyard:rl:",
        lease: float = 60.0,
        timeout: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._admit = self._redis.register_script(ADMIT)
        self._settle = self._redis.register_script(SETTLE)
        self.prefix, self.lease, self._clock = prefix, lease, clock
        self.local = LocalLimits(clock)
        self._down_until = 0.0
        self._down = False
        self._held: dict[str, _RedisSlot] = {}
        self._renewer: asyncio.Task[None] | None = None
        metrics.LIMITS_BACKEND.set(1)

    def _key(self, subject: str, kind: str, window: int | None = None) -> str:
        base = f"{self.prefix}{{{subject}}}:{kind}"
        return base if window is None else f"{base}:{window}"

    @property
    def degraded(self) -> bool:
        """True while limits are counted locally because Redis failed."""
        return self._down

    def _outage(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + RETRY_AFTER_OUTAGE
        if not self._down:
            self._down = True
            metrics.LIMITS_BACKEND.set(0)
            log.warning(
                "redis unreachable: limits are per router until it returns",
                extra={"error": type(exc).__name__},
            )

    def _recovered(self) -> None:
        if self._down:
            self._down = False
            metrics.LIMITS_BACKEND.set(1)
            log.warning("redis reachable again: limits are shared")

    async def admit(self, spec: LimitSpec, member: str) -> Slot:
        """Admit in Redis, or locally while Redis is down."""
        if time.monotonic() < self._down_until:
            return await self.local.admit(spec, member)
        now = self._clock()
        window = int(now // WINDOW)
        keys = [
            self._key(spec.subject, "rpm", window),
            self._key(spec.subject, "tpm", window),
            self._key(spec.subject, "slots"),
        ]
        args: list[int | str] = [
            -1 if spec.rpm is None else spec.rpm,
            -1 if spec.tpm is None else spec.tpm,
            -1 if spec.concurrency is None else spec.concurrency,
            int(now * 1000),
            int(self.lease * 1000),
            member,
        ]
        try:
            verdict = int(await self._admit(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            self._outage(exc)
            return await self.local.admit(spec, member)
        self._recovered()
        if verdict == 1:
            raise rpm_exceeded(spec, now)
        if verdict == 2:
            raise tpm_exceeded(spec, now)
        if verdict == 3:
            raise concurrency_exceeded(spec)
        slot = _RedisSlot(self, spec, member)
        if spec.concurrency is not None:
            self._held[member] = slot
            self._ensure_renewer()
        return slot

    async def release(self, slot: _RedisSlot, tokens: int) -> None:
        """Free the slot and count tokens; a failure is logged, the lease expires it."""
        self._held.pop(slot.member, None)
        if slot.spec.concurrency is None and (slot.spec.tpm is None or tokens <= 0):
            return
        window = int(self._clock() // WINDOW)
        keys = [self._key(slot.spec.subject, "slots"), self._key(slot.spec.subject, "tpm", window)]
        try:
            await self._settle(keys=keys, args=[slot.member, tokens if slot.spec.tpm else 0])
        except (RedisError, OSError) as exc:
            self._outage(exc)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(), name="slot-leases")

    async def _renew(self) -> None:
        """Push the lease of every held slot forward until none is held."""
        while self._held:
            await asyncio.sleep(self.lease / 3)
            expiry = int((self._clock() + self.lease) * 1000)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for slot in list(self._held.values()):
                        key = self._key(slot.spec.subject, "slots")
                        pipe.zadd(key, {slot.member: expiry}, xx=True)
                        pipe.pexpire(key, int(self.lease * 1000))
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                self._outage(exc)

    async def close(self) -> None:
        """Stop renewing leases and close the connection pool."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._redis.aclose()
