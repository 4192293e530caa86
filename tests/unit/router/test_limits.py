"""Limits: in-process counters, Redis counters shared by routers, Redis down."""

from __future__ import annotations

import logging
import uuid

import pytest
from tokenyard.auth.v1 import resources_pb2 as res

from services.common.errors import InvalidArgument, ResourceExhausted
from services.router.limits import (
    LimitSpec,
    LocalLimits,
    check_quota,
    effective_max_tokens,
    quota_period_end,
)
from services.router.redis_limits import RedisLimits

REDIS = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_requests_per_minute_resets_with_the_window() -> None:
    clock = Clock(1_800_000_000.0)  # a multiple of 60: start of a window
    limits = LocalLimits(clock)
    spec = LimitSpec("k", rpm=2)
    for _ in range(2):
        await (await limits.admit(spec, "r")).settle(0)
    with pytest.raises(ResourceExhausted) as info:
        await limits.admit(spec, "r")
    assert info.value.reason == "RATE_LIMIT_REQUESTS"
    assert info.value.retry_after == pytest.approx(60.0)
    assert info.value.quota_subject == "credential:k"
    clock.now += 60
    await limits.admit(spec, "r")


async def test_tokens_per_minute_counts_settled_tokens() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    spec = LimitSpec("k", tpm=100)
    slot = await limits.admit(spec, "r")
    await limits.admit(spec, "r2")  # admitted: nothing settled yet
    await slot.settle(100)
    with pytest.raises(ResourceExhausted) as info:
        await limits.admit(spec, "r3")
    assert info.value.reason == "RATE_LIMIT_TOKENS"
    clock.now += 60
    await limits.admit(spec, "r4")


async def test_concurrent_streams_are_released_once() -> None:
    limits = LocalLimits()
    spec = LimitSpec("k", concurrency=1)
    slot = await limits.admit(spec, "a")
    with pytest.raises(ResourceExhausted) as info:
        await limits.admit(spec, "b")
    assert info.value.reason == "CONCURRENCY_LIMIT"
    await slot.settle(5)
    await slot.settle(5)  # settling twice frees one slot only
    second = await limits.admit(spec, "c")
    with pytest.raises(ResourceExhausted):
        await limits.admit(spec, "d")
    await second.settle(0)
    assert limits.streams("k") == 0


def test_quota_counts_auth_usage_plus_local() -> None:
    limits = res.Limits(token_quota=1000, quota_period=res.QUOTA_PERIOD_DAY)
    check_quota(limits, 999, "k", 1_800_000_000.0)
    with pytest.raises(ResourceExhausted) as info:
        check_quota(limits, 1000, "k", 1_800_000_000.0)
    assert info.value.reason == "QUOTA_EXHAUSTED"
    assert 0 < (info.value.retry_after or 0) <= 86400
    check_quota(res.Limits(), 10**12, "k", 0)  # no quota: no limit


def test_quota_periods_end_at_utc_midnight_and_month_end() -> None:
    # 2027-01-15T12:00:00Z
    now = 1_800_000_000.0 - (1_800_000_000 % 86400) + 43200
    assert quota_period_end(now, monthly=False) - now == 43200
    assert quota_period_end(1_801_000_000.0, monthly=True) % 86400 == 0


def test_max_tokens_over_the_key_limit_is_invalid() -> None:
    limits = res.Limits(max_tokens_per_request=64)
    assert effective_max_tokens(None, limits) == 64
    assert effective_max_tokens(10, limits) == 10
    assert effective_max_tokens(None, res.Limits()) is None
    with pytest.raises(InvalidArgument) as info:
        effective_max_tokens(65, limits)
    assert info.value.field == "sampling.max_tokens"


@pytest.mark.redis
async def test_redis_limits_hold_across_two_routers() -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    a, b = RedisLimits(REDIS, prefix=prefix), RedisLimits(REDIS, prefix=prefix)
    try:
        spec = LimitSpec("k", rpm=3, concurrency=2)
        s1 = await a.admit(spec, "r1")
        await b.admit(spec, "r2")
        with pytest.raises(ResourceExhausted) as info:
            await a.admit(spec, "r3")
        assert info.value.reason == "CONCURRENCY_LIMIT"
        await s1.settle(0)
        await b.admit(spec, "r4")  # third request of the minute, slot freed by a
        await (await a.admit(LimitSpec("other", rpm=1), "x")).settle(0)
        await s1.settle(0)
        with pytest.raises(ResourceExhausted) as info:
            await a.admit(LimitSpec("k", rpm=3), "r5")
        assert info.value.reason == "RATE_LIMIT_REQUESTS"
        assert not a.degraded and not b.degraded
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_redis_tokens_per_minute_shared() -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    a, b = RedisLimits(REDIS, prefix=prefix), RedisLimits(REDIS, prefix=prefix)
    try:
        spec = LimitSpec("k", tpm=50)
        await (await a.admit(spec, "r1")).settle(60)
        with pytest.raises(ResourceExhausted) as info:
            await b.admit(spec, "r2")
        assert info.value.reason == "RATE_LIMIT_TOKENS"
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_slot_of_a_crashed_router_expires_with_its_lease() -> None:
    import asyncio

    prefix = f"test:{uuid.uuid4().hex}:"
    crashed = RedisLimits(REDIS, prefix=prefix, lease=0.3)
    other = RedisLimits(REDIS, prefix=prefix, lease=0.3)
    try:
        spec = LimitSpec("k", concurrency=1)
        await crashed.admit(spec, "held-forever")
        if crashed._renewer is not None:  # the crash: nobody renews the lease any more
            crashed._renewer.cancel()
        with pytest.raises(ResourceExhausted):
            await other.admit(spec, "r2")
        await asyncio.sleep(0.4)
        await other.admit(spec, "r3")
    finally:
        await crashed.close()
        await other.close()


async def test_redis_down_falls_back_to_local_limits_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = RedisLimits("redis://127.0.0.1:1/0", prefix="x:")
    try:
        spec = LimitSpec("k", rpm=2, concurrency=5)
        with caplog.at_level(logging.WARNING, logger="tokenyard.router.limits"):
            slots = [await limits.admit(spec, f"r{i}") for i in range(2)]
            with pytest.raises(ResourceExhausted):
                await limits.admit(spec, "r3")  # still limited, per router
            for slot in slots:
                await slot.settle(1)
        assert limits.degraded
        outage_logs = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
        assert len(outage_logs) == 1
        assert limits.local.streams("k") == 0
    finally:
        await limits.close()
