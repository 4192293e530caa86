"""The router as a process between the real auth and worker processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.auth.v1 import usage_service_pb2 as usage_pb
from tokenyard.auth.v1 import usage_service_pb2_grpc as usage_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc

from services.common.status import details_of
from tests.conftest import WAIT_TIMEOUT, eventually
from tests.doubles.fake_worker import expected_token
from tests.integration.router.conftest import (
    TOKENYARD,
    Launcher,
    Proc,
    base_env,
    bearer,
    bootstrap,
    make_user,
)
from tests.services import REDIS_URL

MODEL = "fake-model"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Launcher, Proc, str]]:
    """One real auth process for the module (long cache TTL: only pushes revoke early)."""
    tmp = tmp_path_factory.mktemp("router-auth")
    launcher = Launcher(tmp)
    db = tmp / "auth.db"
    admin = bootstrap(db)
    auth = launcher.auth(db, TOKENYARD_AUTH_CACHE_TTL="60", TOKENYARD_AUTH_PRINCIPAL_CACHE_TTL="0")
    try:
        yield launcher, auth, admin
    finally:
        launcher.close()


def request(prompt: str, max_tokens: int) -> gen.StreamGenerateRequest:
    req = gen.StreamGenerateRequest(model=MODEL, prompt=prompt)
    req.sampling.max_tokens = max_tokens
    return req


async def stream_tokens(
    stub: gen_grpc.GenerationServiceStub, req: gen.StreamGenerateRequest, key: str
) -> list[int]:
    return [t async for m in stub.StreamGenerate(req, metadata=bearer(key)) for t in m.token_ids]


async def test_sigkill_of_a_worker_under_16_streams_loses_no_token(
    shared: tuple[Launcher, Proc, str], launcher: Launcher
) -> None:
    _, auth, admin = shared
    user = make_user(auth, admin)
    workers = [launcher.fake_worker("--token-delay", "0.01", wait=False) for _ in range(3)]
    for worker in workers:
        launcher.wait_serving(worker)
    router = launcher.router(auth, workers)
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        requests = [request(f"stream number {i}", 150) for i in range(16)]
        started = asyncio.Event()
        progress = [0] * 16

        async def run(i: int) -> list[int] | grpc.StatusCode:
            tokens: list[int] = []
            try:
                async for msg in stub.StreamGenerate(requests[i], metadata=bearer(user.key)):
                    tokens.extend(msg.token_ids)
                    progress[i] = len(tokens)
                    if all(p >= 10 for p in progress):
                        started.set()
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return tokens

        tasks = [asyncio.create_task(run(i)) for i in range(16)]
        await asyncio.wait_for(started.wait(), 30)
        workers[0].signal(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)  # none hangs
    for req, result in zip(requests, results, strict=True):
        if isinstance(result, grpc.StatusCode):  # a clean status, never INTERNAL
            assert result in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
            continue
        assert result == [expected_token(req, i) for i in range(150)]
    # Two workers remain with room for every stream: all of them completed.
    assert all(isinstance(r, list) for r in results), [
        r for r in results if not isinstance(r, list)
    ]


async def test_a_worker_dying_mid_stream_ends_an_n_samples_stream_with_unavailable(
    shared: tuple[Launcher, Proc, str], launcher: Launcher
) -> None:
    """n > 1 is not resumed on another worker: the stream ends with a clean status
    after the tokens already relayed, never a hang; a healthy worker remains."""
    _, auth, admin = shared
    user = make_user(auth, admin)
    dying = launcher.fake_worker("--token-delay", "0.01", "--die-after-tokens", "10")
    healthy = launcher.fake_worker("--token-delay", "0.01")
    router = launcher.router(auth, [dying, healthy], TOKENYARD_ROUTER_POLICY="round_robin")
    req = request("two samples", 40)
    req.n = 2
    outcomes: list[tuple[int, grpc.StatusCode | None, str]] = []
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        for _ in range(2):  # round robin: one of the two lands on the dying worker
            received = 0
            try:
                async for msg in stub.StreamGenerate(req, metadata=bearer(user.key)):
                    received += len(msg.token_ids)
                outcomes.append((received, None, ""))
            except grpc.aio.AioRpcError as exc:
                outcomes.append((received, exc.code(), details_of(exc).reason))
    cut, whole = sorted(outcomes, key=lambda o: o[0])
    # The worker exits right after its 10th token: at most those reached the client.
    assert 0 < cut[0] <= 10 and cut[1:] == (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")
    assert whole == (80, None, "")


async def test_revocation_reaches_the_router_before_the_cache_time(
    shared: tuple[Launcher, Proc, str], launcher: Launcher
) -> None:
    _, auth, admin = shared
    user = make_user(auth, admin)
    router = launcher.router(auth, [launcher.fake_worker()])
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        assert len(await stream_tokens(stub, request("hi", 3), user.key)) == 3
        async with grpc.aio.insecure_channel(auth.address) as auth_channel:
            await keys_grpc.ApiKeyServiceStub(auth_channel).RevokeApiKey(
                keys_pb.RevokeApiKeyRequest(key_id=user.key_id), metadata=bearer(admin)
            )
        # Auth grants a 60 s cache; only the pushed revocation can refuse it sooner.
        # A bound well under the cache's 60 s, with room for a starved machine.
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            try:
                await stream_tokens(stub, request("hi", 1), user.key)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                return
            await asyncio.sleep(0.05)
    pytest.fail("revoked key still served after 30 s")


@pytest.mark.redis
async def test_limits_hold_across_two_routers_sharing_redis(
    shared: tuple[Launcher, Proc, str], launcher: Launcher
) -> None:
    _, auth, admin = shared
    user = make_user(auth, admin, limits=res.Limits(requests_per_minute=4))
    worker = launcher.fake_worker()
    env = {
        "TOKENYARD_REDIS_URL": REDIS_URL,
        "TOKENYARD_ROUTER_REDIS_PREFIX": f"test:{uuid.uuid4().hex}:",
    }
    routers = [launcher.router(auth, [worker], wait=False, **env) for _ in range(2)]
    for router in routers:
        launcher.wait_serving(router)
    channels = [grpc.aio.insecure_channel(r.address) for r in routers]
    try:
        stubs = [gen_grpc.GenerationServiceStub(c) for c in channels]
        for i in range(4):
            await stream_tokens(stubs[i % 2], request("hi", 1), user.key)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream_tokens(stubs[0], request("hi", 1), user.key)
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = details_of(err)
        assert details.retry_after and details.quota_violations
    finally:
        for c in channels:
            await c.close()


@pytest.mark.redis
async def test_the_response_cache_holds_across_two_routers_sharing_redis(
    shared: tuple[Launcher, Proc, str], launcher: Launcher
) -> None:
    """Issue 18 §3: the role's response_cache limit flows auth → router; an answer
    generated through one router is replayed by the other, for its user only; the
    ledger records the hits' tokens as cached, apart from generated ones."""
    _, auth, admin = shared
    on = res.Limits(response_cache=True)
    alice, bob = make_user(auth, admin, limits=on), make_user(auth, admin, limits=on)
    worker = launcher.fake_worker()
    env = {
        "TOKENYARD_REDIS_URL": REDIS_URL,
        "TOKENYARD_ROUTER_REDIS_PREFIX": f"test:{uuid.uuid4().hex}:",
        "TOKENYARD_ROUTER_RESPONSE_CACHE_PREFIX": f"test:rc:{uuid.uuid4().hex}:",
    }
    routers = [launcher.router(auth, [worker], wait=False, **env) for _ in range(2)]
    for router in routers:
        launcher.wait_serving(router)
    greedy = request("a question asked twice", 5)
    greedy.sampling.temperature = 0.0

    async def last_usage(stub: gen_grpc.GenerationServiceStub, key: str) -> gen.Usage:
        messages = [m async for m in stub.StreamGenerate(greedy, metadata=bearer(key))]
        usage: gen.Usage = messages[-1].usage
        return usage

    channels = [grpc.aio.insecure_channel(r.address) for r in routers]
    try:
        stubs = [gen_grpc.GenerationServiceStub(c) for c in channels]
        assert not (await last_usage(stubs[0], alice.key)).cached
        assert (await last_usage(stubs[1], alice.key)).cached
        assert not (await last_usage(stubs[1], bob.key)).cached  # another tenant: a miss
        hits = await asyncio.gather(*(last_usage(stubs[i % 2], alice.key) for i in range(8)))
        assert all(u.cached and u.cached_completion_tokens == 5 for u in hits)
        reply = usage_pb.GetUsageResponse()
        async with grpc.aio.insecure_channel(auth.address) as auth_channel:
            usage = usage_grpc.UsageServiceStub(auth_channel)

            async def recorded() -> bool:
                reply.CopyFrom(
                    await usage.GetUsage(
                        usage_pb.GetUsageRequest(user_id=alice.user_id), metadata=bearer(admin)
                    )
                )
                return bool(reply.total_requests >= 10)

            await eventually(recorded, what="alice's 10 usage records")
        assert reply.total_requests == 10
        assert reply.total_completion_tokens == 5  # generated once
        assert reply.total_cached_completion_tokens == 9 * 5
    finally:
        for c in channels:
            await c.close()


async def test_usage_counts_are_exact_after_an_auth_restart(
    launcher: Launcher, tmp_path: Path
) -> None:
    db = tmp_path / "auth.db"
    admin = bootstrap(db)
    auth = launcher.auth(db, TOKENYARD_AUTH_CACHE_TTL="60")
    user = make_user(auth, admin)
    router = launcher.router(auth, [launcher.fake_worker()])
    async with grpc.aio.insecure_channel(router.address) as channel:
        stub = gen_grpc.GenerationServiceStub(channel)
        for n in (1, 2, 3):
            await stream_tokens(stub, request("one two", n), user.key)
        assert auth.stop() == 0
        for n in (4, 5, 6, 7):  # served from the router's cache while auth is down
            await stream_tokens(stub, request("one two", n), user.key)
        auth = launcher.auth(db, port=auth.port, TOKENYARD_AUTH_CACHE_TTL="60")
        async with grpc.aio.insecure_channel(auth.address) as auth_channel:
            usage = usage_grpc.UsageServiceStub(auth_channel)
            reply = usage_pb.GetUsageResponse()
            deadline = asyncio.get_running_loop().time() + WAIT_TIMEOUT
            while asyncio.get_running_loop().time() < deadline:
                reply = await usage.GetUsage(
                    usage_pb.GetUsageRequest(user_id=user.user_id), metadata=bearer(admin)
                )
                if reply.total_requests >= 7:
                    break
                await asyncio.sleep(0.05)
    assert reply.total_requests == 7
    assert reply.total_completion_tokens == sum(range(1, 8))
    assert reply.total_prompt_tokens == 7 * 2


def test_bad_policy_stops_the_start_with_one_line_naming_the_variable() -> None:
    env = base_env(TOKENYARD_ROUTER_POLICY="fastest")
    out = subprocess.run(
        [TOKENYARD, "router", "serve"], env=env, capture_output=True, timeout=60, check=False
    )
    assert out.returncode == 2
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "TOKENYARD_ROUTER_POLICY" in lines[0]
