"""Limits shared by router replicas, counted in Redis with atomic Lua scripts.

Keys (one hash tag per user, so a Redis Cluster keeps all of a request's counters
on one shard): `<prefix>{<user>}:<subject>:rpm:<minute>` and `:tpm:<minute>` are
fixed-window counters that expire after two minutes; `:slots` is a sorted set of
the subject's running streams scored by lease expiry; `<prefix>{<user>}:quota:
<period>` counts the user's reserved and used tokens of the quota period. One
script checks every counter of a request and then counts it in all of them, so
concurrent admissions on any number of routers see each other's reservations.
A router renews the leases of its streams every third of the lease, so a crashed
router's slots expire on their own instead of leaking.

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
    Admission,
    LocalLimits,
    Slot,
    concurrency_exceeded,
    quota_exceeded,
    quota_period,
    quota_period_end,
    rpm_exceeded,
    tpm_exceeded,
)

log = logging.getLogger("tokenyard.router.limits")

# KEYS: per subject rpm, tpm, slots; then the quota counter when ARGV[7] is 1.
# ARGV: now_ms, lease_ms, member, reserve, stream, subjects, has_quota, quota,
# quota_used, quota_ttl_ms, then per subject rpm, tpm, concurrency (-1: none).
# Returns {0} admitted, or {1 rpm | 2 tpm | 3 concurrency | 4 quota, subject index}.
ADMIT = """
local now_ms, lease_ms, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local reserve, stream, n = tonumber(ARGV[4]), ARGV[5] == '1', tonumber(ARGV[6])
for i = 1, n do
  local rpm, tpm, conc = tonumber(ARGV[8 + 3 * i]), tonumber(ARGV[9 + 3 * i]),
    tonumber(ARGV[10 + 3 * i])
  local k = 3 * (i - 1)
  if tpm >= 0 and tonumber(redis.call('GET', KEYS[k + 2]) or '0') >= tpm then return {2, i} end
  if stream and conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[k + 3]) >= conc then return {3, i} end
  end
  if rpm >= 0 and tonumber(redis.call('GET', KEYS[k + 1]) or '0') >= rpm then return {1, i} end
end
if ARGV[7] == '1' then
  local q = KEYS[3 * n + 1]
  local used = math.max(tonumber(redis.call('GET', q) or '0'), tonumber(ARGV[9]))
  if used >= tonumber(ARGV[8]) then return {4, 0} end
  redis.call('SET', q, used + reserve, 'PX', tonumber(ARGV[10]))
end
for i = 1, n do
  local rpm, tpm, conc = tonumber(ARGV[8 + 3 * i]), tonumber(ARGV[9 + 3 * i]),
    tonumber(ARGV[10 + 3 * i])
  local k = 3 * (i - 1)
  if rpm >= 0 then
    redis.call('INCR', KEYS[k + 1])
    redis.call('PEXPIRE', KEYS[k + 1], 120000)
  end
  if tpm >= 0 then
    redis.call('INCRBY', KEYS[k + 2], reserve)
    redis.call('PEXPIRE', KEYS[k + 2], 120000)
  end
  if stream and conc >= 0 then
    redis.call('ZADD', KEYS[k + 3], now_ms + lease_ms, member)
    redis.call('PEXPIRE', KEYS[k + 3], lease_ms)
  end
end
return {0, 0}
"""

# Frees a slot and settles tokens. KEYS: slot sets to leave, then counters to
# correct; ARGV: member, number of slot sets, delta (used - reserved).
SETTLE = """
local n = tonumber(ARGV[2])
for i = 1, n do redis.call('ZREM', KEYS[i], ARGV[1]) end
local delta = tonumber(ARGV[3])
for i = n + 1, #KEYS do
  if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('INCRBY', KEYS[i], delta) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
  end
end
return 0
"""

RETRY_AFTER_OUTAGE = 1.0


class _RedisSlot:
    __slots__ = ("admission", "counters", "limits", "released", "slot_sets")

    def __init__(
        self,
        limits: RedisLimits,
        admission: Admission,
        slot_sets: list[str],
        counters: list[str],
    ) -> None:
        self.limits, self.admission = limits, admission
        self.slot_sets, self.counters, self.released = slot_sets, counters, False

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

    def _key(self, tag: str, subject: str, kind: str, window: int | None = None) -> str:
        base = f"{self.prefix}{{{tag}}}:{subject}:{kind}"
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

    async def admit(self, admission: Admission) -> Slot:
        """Admit in Redis, or locally while Redis is down."""
        if time.monotonic() < self._down_until:
            return await self.local.admit(admission)
        now = self._clock()
        window = int(now // WINDOW)
        tag, specs, quota = admission.tag, admission.specs, admission.quota
        keys: list[str] = []
        args: list[int | str] = [
            int(now * 1000),
            int(self.lease * 1000),
            admission.member,
            admission.reserve,
            int(admission.stream),
            len(specs),
            int(quota is not None),
            0 if quota is None else quota.limit,
            0 if quota is None else quota.used,
            0
            if quota is None
            else int((quota_period_end(now, monthly=quota.monthly) - now + 86400) * 1000),
        ]
        counters: list[str] = []
        slot_sets: list[str] = []
        for spec in specs:
            tpm_key = self._key(tag, spec.subject, "tpm", window)
            slots_key = self._key(tag, spec.subject, "slots")
            keys += [self._key(tag, spec.subject, "rpm", window), tpm_key, slots_key]
            args += [-1 if v is None else v for v in (spec.rpm, spec.tpm, spec.concurrency)]
            if spec.tpm is not None:
                counters.append(tpm_key)
            if admission.stream and spec.concurrency is not None:
                slot_sets.append(slots_key)
        if quota is not None:
            period = quota_period(now, monthly=quota.monthly)
            quota_key = self._key(tag, quota.subject, "quota", period)
            keys.append(quota_key)
            counters.append(quota_key)
        try:
            verdict, index = (int(v) for v in await self._admit(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            self._outage(exc)
            return await self.local.admit(admission)
        self._recovered()
        if verdict == 1:
            raise rpm_exceeded(specs[index - 1], now)
        if verdict == 2:
            raise tpm_exceeded(specs[index - 1], now)
        if verdict == 3:
            raise concurrency_exceeded(specs[index - 1])
        if verdict == 4 and quota is not None:
            raise quota_exceeded(quota, now)
        slot = _RedisSlot(self, admission, slot_sets, counters)
        if slot_sets:
            self._held[admission.member] = slot
            self._ensure_renewer()
        return slot

    async def release(self, slot: _RedisSlot, tokens: int) -> None:
        """Free the slot and settle tokens; a failure is logged, the lease expires it."""
        self._held.pop(slot.admission.member, None)
        delta = tokens - slot.admission.reserve
        if not slot.slot_sets and (not slot.counters or delta == 0):
            return
        keys = slot.slot_sets + (slot.counters if delta else [])
        try:
            await self._settle(keys=keys, args=[slot.admission.member, len(slot.slot_sets), delta])
        except (RedisError, OSError) as exc:
            self._outage(exc)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(), name="slot-leases")

    async def _renew(self) -> None:
        """Push the lease of every held slot forward until none is held."""
        while self._held:
            await asyncio.sleep(self.lease / 3)
            await self.renew_now()

    async def renew_now(self) -> None:
        """Push the lease of every held slot to now + lease (by the injected clock)."""
        expiry = int((self._clock() + self.lease) * 1000)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for slot in list(self._held.values()):
                    for key in slot.slot_sets:
                        pipe.zadd(key, {slot.admission.member: expiry}, xx=True)
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
