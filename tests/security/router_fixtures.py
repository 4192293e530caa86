"""Fixtures of the router's security tests: a real router on loopback over test doubles.

`stack` starts the test-double auth (real gRPC, principals in memory) and
test-double workers in this process, and routers whose limits run either
in-process or in the real Redis on 127.0.0.1:6379 under a fresh key prefix.
Every limit clock is a `Clock` the test controls, so a minute boundary never
resets a counter mid-test. Everything a test starts is stopped by the fixture.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
import redis

from services.router.app import RouterApp
from tests.conftest import eventually
from tests.unit.router.conftest import Stack, bearer

REDIS = "redis://127.0.0.1:6379/0"
BACKENDS = ("local", "redis")
T0 = 1_800_000_000.0  # a multiple of 60: the start of a limits window


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def redis_up() -> bool:
    """True when the Redis server on 127.0.0.1:6379 answers."""
    try:
        return bool(redis.Redis.from_url(REDIS, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


class SecurityStack(Stack):
    """The router unit suite's Stack, with routers on a chosen limits backend and clock."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.clock = Clock()
        self.prefix = f"test:sec:{uuid.uuid4().hex}:"

    async def limited_router(self, **overrides: Any) -> RouterApp:
        """A router whose limits use this stack's backend and clock."""
        if self.backend == "redis":
            overrides.setdefault("redis_url", REDIS)
            overrides.setdefault("redis_prefix", self.prefix)
        return await self.router(clock=self.clock, **overrides)


@pytest.fixture(params=BACKENDS)
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[SecurityStack]:
    """A SecurityStack on each limits backend (Redis: needs redis-server on :6379)."""
    if request.param == "redis" and not redis_up():
        pytest.skip(
            "Redis is not running on 127.0.0.1:6379 (start it: redis-server --daemonize yes)"
        )
    s = SecurityStack(request.param)
    await s.start_auth()
    try:
        yield s
    finally:
        await s.close()


async def outcome(call: Awaitable[Any]) -> grpc.StatusCode:
    """The status a call ended with (OK when it succeeded)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def drain(call: Any) -> list[Any]:
    """Every message of a server stream."""
    return [message async for message in call]


__all__ = [
    "BACKENDS",
    "Clock",
    "SecurityStack",
    "bearer",
    "drain",
    "eventually",
    "outcome",
    "stack",
]
