"""Redis stopped while two routers share a concurrency limit through it.

services/router/redis_limits.py documents the behaviour: while Redis is down each
router counts limits in-process (the effective limit is per router for the
outage), generation keeps working, and the limit is shared again once Redis
returns. This test starts its own redis-server (never the machine's on 6379).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from tests.conftest import WAIT_TIMEOUT, free_port
from tests.integration.router.conftest import bearer
from tests.reliability.conftest import Proc, Stack
from tests.reliability.streams import request

LIMIT = 2


class RedisServer:
    """A throwaway redis-server on a free port, without persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + WAIT_TIMEOUT
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.05)
            raise RuntimeError("redis-server did not start")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """Our own redis-server for one test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


Held = tuple[grpc.aio.Channel, Any]


async def hold(router: Proc, key: str, name: str) -> Held | str:
    """Open a long stream and read its first message; the status name if refused."""
    channel = grpc.aio.insecure_channel(router.address)
    call = gen_grpc.GenerationServiceStub(channel).StreamGenerate(
        request(name, 3000), metadata=bearer(key)
    )
    try:
        await call.read()
    except grpc.aio.AioRpcError as exc:
        await channel.close()
        return str(exc.code().name)
    return channel, call


async def admitted(router: Proc, key: str, n: int, tag: str) -> tuple[list[Held], list[str]]:
    """Try `n` concurrent streams on `router`: (held ones, statuses of refused ones)."""
    held: list[Held] = []
    refused: list[str] = []
    for i in range(n):
        got = await hold(router, key, f"{tag} {i}")
        if isinstance(got, str):
            refused.append(got)
        else:
            held.append(got)
    return held, refused


async def release(held: list[Held]) -> None:
    """Cancel held streams and close their channels."""
    for channel, call in held:
        call.cancel()
        await channel.close()


async def wait_free(router: Proc, key: str) -> None:
    """Wait until the routers settled cancelled streams (a stream is admitted again)."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while time.monotonic() < deadline:
        held, refused = await admitted(router, key, 1, "probe")
        await release(held)
        if not refused:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("slots were not freed")


async def shared_again(router: Proc, key: str) -> None:
    """Probe `router` with a stream until it found Redis again (after its retry interval)."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    while "redis reachable again" not in router.output():
        assert time.monotonic() < deadline, "the router never went back to Redis"
        held, _ = await admitted(router, key, 1, "probe")
        await release(held)
        await asyncio.sleep(0.1)


async def test_routers_share_limits_in_redis_and_fall_back_per_router_while_it_is_down(
    stack: Stack, own_redis: RedisServer, report: dict[str, object]
) -> None:
    url = f"sqlite:///{stack.tmp / 'auth.db'}"
    admin = stack.bootstrap(url)
    auth = stack.auth_url(url)
    user = stack.user(auth, admin, limits=res.Limits(concurrent_streams=LIMIT))
    worker = stack.engine_worker(delay=0.02)
    env = {
        "TOKENYARD_REDIS_URL": own_redis.url,
        "TOKENYARD_ROUTER_REDIS_PREFIX": f"rel-{uuid.uuid4().hex[:8]}:",
    }
    a, b = stack.start_router(auth, [worker], **env), stack.start_router(auth, [worker], **env)
    phases: dict[str, dict[str, object]] = {}

    # Redis up: LIMIT streams on router A use the user's every slot, on B too.
    held_a, refused_a = await admitted(a, user.key, LIMIT, "up a")
    held_b, refused_b = await admitted(b, user.key, 1, "up b")
    phases["redis up"] = dict(admitted=len(held_a + held_b), refused=refused_a + refused_b)
    await release(held_a + held_b)
    assert (len(held_a), refused_b) == (LIMIT, ["RESOURCE_EXHAUSTED"])
    await wait_free(b, user.key)

    # Redis down: generation keeps working; each router enforces the limit by itself.
    own_redis.stop()
    held_a, refused_a = await admitted(a, user.key, LIMIT + 1, "down a")
    held_b, refused_b = await admitted(b, user.key, LIMIT + 1, "down b")
    phases["redis down"] = dict(admitted=len(held_a + held_b), refused=refused_a + refused_b)
    await release(held_a + held_b)
    assert (len(held_a), refused_a) == (LIMIT, ["RESOURCE_EXHAUSTED"])
    assert (len(held_b), refused_b) == (LIMIT, ["RESOURCE_EXHAUSTED"])
    await wait_free(a, user.key)
    await wait_free(b, user.key)

    # Redis back (empty): after the retry interval the limit is shared again.
    own_redis.start()
    await shared_again(a, user.key)
    await shared_again(b, user.key)
    held_a, refused_a = await admitted(a, user.key, LIMIT, "back a")
    held_b, refused_b = await admitted(b, user.key, 1, "back b")
    phases["redis back"] = dict(admitted=len(held_a + held_b), refused=refused_a + refused_b)
    await release(held_a + held_b)
    report["redis stopped under shared limits (2 routers, limit 2)"] = phases
    assert (len(held_a), refused_b) == (LIMIT, ["RESOURCE_EXHAUSTED"])
    assert "redis unreachable" in a.output() and "redis reachable again" in a.output()
