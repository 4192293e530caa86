"""Limits: in-process counters, Redis counters shared by routers, Redis down."""

from __future__ import annotations

import logging
import uuid

import pytest
from tokenyard.auth.v1 import resources_pb2 as res

from services.common.errors import InvalidArgument, ResourceExhausted
from services.router.admission import effective_max_tokens
from services.router.limits import (
    Admission,
    LimitSpec,
    LocalLimits,
    QuotaSpec,
    quota_period_end,
)
from services.router.redis_limits import RedisLimits

REDIS = "redis://127.0.0.1:6379/0"
T0 = 1_800_000_000.0  # a multiple of 60: start of a window


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def req(
    member: str, *specs: LimitSpec, reserve: int = 0, quota: QuotaSpec | None = None
) -> Admission:
    """An admission of `member` for the test user."""
    return Admission(tag="u", member=member, specs=specs, reserve=reserve, quota=quota)


async def test_requests_per_minute_resets_with_the_window() -> None:
    clock = Clock(1_800_000_000.0)  # a multiple of 60: start of a window
    limits = LocalLimits(clock)
    spec = LimitSpec("k", rpm=2)
    for _ in range(2):
        await (await limits.admit(req("r", spec))).settle(0)
    with pytest.raises(ResourceExhausted) as info:
        await limits.admit(req("r", spec))
    assert info.value.reason == "RATE_LIMIT_REQUESTS"
    assert info.value.retry_after == pytest.approx(60.0)
    assert info.value.quota_subject == "k"
    clock.now += 60
    await limits.admit(req("r", spec))


async def test_tokens_per_minute_counts_reservations_then_settles_them() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    spec = LimitSpec("k", tpm=100)
    slot = await limits.admit(req("r", spec, reserve=80))
    assert limits.tokens("k") == 80
    await limits.admit(req("r2", spec, reserve=30))  # 80 reserved < 100: admitted
    with pytest.raises(ResourceExhausted) as info:
        await limits.admit(req("r3", spec, reserve=1))  # 110 reserved: refused
    assert info.value.reason == "RATE_LIMIT_TOKENS"
    await slot.settle(10)  # used 10 of its 80: 70 go back
    assert limits.tokens("k") == 40
    await limits.admit(req("r4", spec, reserve=1))
    clock.now += 60
    assert limits.tokens("k") == 0


async def test_the_quota_counts_reservations_from_auths_figure() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    quota = QuotaSpec("user:u", limit=1000, monthly=False, used=900)
    slot = await limits.admit(req("r1", reserve=90, quota=quota))
    await limits.admit(req("r2", reserve=90, quota=quota))  # 990 < 1000: the one over
    with pytest.raises(ResourceExhausted) as info:
        await limits.admit(req("r3", reserve=1, quota=quota))
    assert info.value.reason == "QUOTA_EXHAUSTED"
    assert 0 < (info.value.retry_after or 0) <= 86400
    await slot.settle(0)  # refunded
    await limits.admit(req("r4", reserve=1, quota=quota))
    clock.now += 86400  # a new day: auth's figure for it is 0
    await limits.admit(req("r5", reserve=1, quota=QuotaSpec("user:u", 1000, False, 0)))


async def test_concurrent_streams_are_released_once() -> None:
    limits = LocalLimits()
    spec = LimitSpec("k", concurrency=1)
    slot = await limits.admit(req("a", spec))
    with pytest.raises(ResourceExhausted) as info:
        await limits.admit(req("b", spec))
    assert info.value.reason == "CONCURRENCY_LIMIT"
    await slot.settle(5)
    await slot.settle(5)  # settling twice frees one slot only
    second = await limits.admit(req("c", spec))
    with pytest.raises(ResourceExhausted):
        await limits.admit(req("d", spec))
    await second.settle(0)
    assert limits.streams("k") == 0


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
    clock = Clock()
    a = RedisLimits(REDIS, prefix=prefix, clock=clock)
    b = RedisLimits(REDIS, prefix=prefix, clock=clock)
    try:
        spec = LimitSpec("k", rpm=3, concurrency=2)
        s1 = await a.admit(req("r1", spec))
        await b.admit(req("r2", spec))
        with pytest.raises(ResourceExhausted) as info:
            await a.admit(req("r3", spec))
        assert info.value.reason == "CONCURRENCY_LIMIT"
        await s1.settle(0)
        await b.admit(req("r4", spec))  # third request of the minute, slot freed by a
        await (await a.admit(req("x", LimitSpec("other", rpm=1)))).settle(0)
        await s1.settle(0)
        with pytest.raises(ResourceExhausted) as info:
            await a.admit(req("r5", LimitSpec("k", rpm=3)))
        assert info.value.reason == "RATE_LIMIT_REQUESTS"
        assert not a.degraded and not b.degraded
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_redis_tokens_per_minute_reserved_and_shared() -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    clock = Clock()
    a = RedisLimits(REDIS, prefix=prefix, clock=clock)
    b = RedisLimits(REDIS, prefix=prefix, clock=clock)
    try:
        spec = LimitSpec("k", tpm=50)
        slot = await a.admit(req("r1", spec, reserve=60))
        with pytest.raises(ResourceExhausted) as info:
            await b.admit(req("r2", spec, reserve=1))  # a's reservation counts on b
        assert info.value.reason == "RATE_LIMIT_TOKENS"
        await slot.settle(20)  # 40 refunded
        await (await b.admit(req("r3", spec, reserve=10))).settle(10)
        clock.now += 60
        await b.admit(req("r4", spec, reserve=100))  # a new minute
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_redis_quota_holds_across_routers() -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    clock = Clock()
    a = RedisLimits(REDIS, prefix=prefix, clock=clock)
    b = RedisLimits(REDIS, prefix=prefix, clock=clock)
    try:
        quota = QuotaSpec("user:u", limit=100, monthly=True, used=50)
        await a.admit(req("r1", reserve=60, quota=quota))
        with pytest.raises(ResourceExhausted) as info:
            await b.admit(req("r2", reserve=1, quota=quota))
        assert info.value.reason == "QUOTA_EXHAUSTED"
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
async def test_slot_of_a_crashed_router_expires_with_its_lease() -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    clock = Clock()
    crashed = RedisLimits(REDIS, prefix=prefix, lease=30.0, clock=clock)
    other = RedisLimits(REDIS, prefix=prefix, lease=30.0, clock=clock)
    try:
        spec = LimitSpec("k", concurrency=1)
        await crashed.admit(req("held-forever", spec))
        await crashed.close()  # the crash: nobody renews the lease any more
        with pytest.raises(ResourceExhausted):
            await other.admit(req("r2", spec))
        clock.now += 29.0
        with pytest.raises(ResourceExhausted):
            await other.admit(req("r3", spec))
        clock.now += 2.0  # past the lease, by the routers' clock
        await other.admit(req("r4", spec))
    finally:
        await other.close()


@pytest.mark.redis
async def test_a_live_router_renews_its_leases() -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    clock = Clock()
    live = RedisLimits(REDIS, prefix=prefix, lease=30.0, clock=clock)
    other = RedisLimits(REDIS, prefix=prefix, lease=30.0, clock=clock)
    try:
        spec = LimitSpec("k", concurrency=1)
        await live.admit(req("held", spec))
        clock.now += 20.0
        await live.renew_now()
        clock.now += 20.0  # 40 s after admission, 20 s after the renewal
        with pytest.raises(ResourceExhausted):
            await other.admit(req("r2", spec))
    finally:
        await live.close()
        await other.close()


async def test_redis_down_falls_back_to_local_limits_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = RedisLimits("redis://127.0.0.1:1/0", prefix="x:", clock=Clock())
    try:
        spec = LimitSpec("k", rpm=2, concurrency=5)
        with caplog.at_level(logging.WARNING, logger="tokenyard.router.limits"):
            slots = [await limits.admit(req(f"r{i}", spec)) for i in range(2)]
            with pytest.raises(ResourceExhausted):
                await limits.admit(req("r3", spec))  # still limited, per router
            for slot in slots:
                await slot.settle(1)
        assert limits.degraded
        outage_logs = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
        assert len(outage_logs) == 1
        assert limits.local.streams("k") == 0
    finally:
        await limits.close()
