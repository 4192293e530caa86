"""Issue 18 §1/§3: the router's response cache, on each store (in-process LRU, Redis).

A real router on loopback over the test-double auth and workers: a worker's
request count tells whether a worker generated an answer or the cache did.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
import redis.asyncio as aredis
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.generation.v1 import generation_service_pb2 as gen

from services.router.app import RouterApp
from services.router.relay import StreamState
from services.router.response_cache import complete
from tests.doubles.fake_auth import principal
from tests.doubles.fake_worker import FakeWorker
from tests.security import router_fixtures
from tests.security.router_fixtures import REDIS, SecurityStack, bearer, drain, eventually
from tests.unit.router.conftest import MODEL

stack = router_fixtures.stack  # the fixture, on each backend (limits and cache)

KEY_A = "ty_sk_cachealpha000000000000000001"
KEY_A2 = "ty_sk_cachealpha000000000000000002"
KEY_B = "ty_sk_cachebeta0000000000000000001"
KEY_OFF = "ty_sk_cacheoff00000000000000000001"
ON = res.Limits(response_cache=True)


def add_keys(stack: SecurityStack, limits: res.Limits = ON) -> None:
    """User A with two keys, user B with one, all with the cache on; a key with it off."""
    stack.auth.state.add_key(KEY_A, principal("cred-a1", user_id="u-a", limits=limits))
    stack.auth.state.add_key(KEY_A2, principal("cred-a2", user_id="u-a", limits=limits))
    stack.auth.state.add_key(KEY_B, principal("cred-b", user_id="u-b", limits=limits))
    stack.auth.state.add_key(KEY_OFF, principal("cred-off", user_id="u-off"))


def greedy(prompt: str = "the same question", max_tokens: int = 6, **fields: Any) -> Any:
    request = gen.StreamGenerateRequest(model=MODEL, prompt=prompt, **fields)
    request.sampling.max_tokens = max_tokens
    request.sampling.temperature = 0.0
    return request


async def router(stack: SecurityStack, **overrides: Any) -> RouterApp:
    """A router on the stack's backend; its Redis keys under the test's own prefix."""
    overrides.setdefault("response_cache_prefix", f"{stack.prefix}rc:")
    return await stack.limited_router(**overrides)


def generated(worker: FakeWorker) -> int:
    """Requests the worker has generated."""
    return len(worker.generation.requests)


async def ask(client: Any, request: Any, key: str = KEY_A) -> list[gen.StreamGenerateResponse]:
    return await drain(client.StreamGenerate(request, metadata=bearer(key)))


def body(messages: list[gen.StreamGenerateResponse]) -> list[tuple[Any, ...]]:
    """What a client reads, less the request id and the cache's own usage fields."""
    return [
        (m.text, list(m.token_ids), m.finish_reason, m.index, m.usage.completion_tokens)
        for m in messages
    ]


async def test_a_repeat_is_answered_from_the_cache_in_the_same_shape(
    stack: SecurityStack,
) -> None:
    """Miss then hit: the worker generates once; the hit has the miss's messages (the
    same chunking and finish reason), a `cached` usage, and its own request id."""
    add_keys(stack)
    worker = await stack.add_worker(tokens_per_message=2)
    client = stack.client(await router(stack))
    first = await ask(client, greedy(request_id="first"))
    assert generated(worker) == 1
    second = await ask(client, greedy(request_id="second"))
    assert generated(worker) == 1, "the repeat reached the worker"
    assert body(second) == body(first)
    assert len(second) == 3  # six tokens, two per message, as recorded
    assert {m.request_id for m in second} == {"second"}
    assert not first[-1].usage.cached and first[-1].usage.cached_completion_tokens == 0
    assert second[-1].usage.cached
    assert second[-1].usage.cached_completion_tokens == second[-1].usage.completion_tokens == 6
    # The unary door shares the entry (one code path).
    unary = gen.GenerateRequest.FromString(greedy().SerializeToString())
    reply = await client.Generate(unary, metadata=bearer(KEY_A))
    assert generated(worker) == 1
    assert reply.text == "".join(m.text for m in first) and reply.usage.cached


async def test_seeded_samples_replay_per_index(stack: SecurityStack) -> None:
    """A seeded request of n = 2 is deterministic: cached, each sample's messages
    replayed with its `index` and finish reason."""
    add_keys(stack)
    worker = await stack.add_worker()
    client = stack.client(await router(stack))
    request = gen.StreamGenerateRequest(model=MODEL, prompt="two samples", n=2)
    request.sampling.max_tokens = 3
    request.sampling.seed = 7
    first = await ask(client, request)
    second = await ask(client, request)
    assert generated(worker) == 1
    assert body(second) == body(first)
    assert sorted(m.index for m in second if m.finish_reason) == [0, 1]


async def test_bypass_refresh_and_sampling_requests(stack: SecurityStack) -> None:
    """BYPASS neither reads nor writes; REFRESH generates and replaces; a request with
    random sampling (no seed, temperature > 0) is never cached; an unknown mode is
    INVALID_ARGUMENT naming `cache`."""
    add_keys(stack)
    worker = await stack.add_worker()
    client = stack.client(await router(stack))
    await ask(client, greedy(cache=gen.CACHE_MODE_BYPASS))
    await ask(client, greedy())  # bypass stored nothing: a miss
    assert generated(worker) == 2
    await ask(client, greedy())
    assert generated(worker) == 2  # a hit
    await ask(client, greedy(cache=gen.CACHE_MODE_BYPASS))
    assert generated(worker) == 3
    refreshed = await ask(client, greedy(cache=gen.CACHE_MODE_REFRESH))
    assert generated(worker) == 4 and not refreshed[-1].usage.cached
    assert (await ask(client, greedy(cache=gen.CACHE_MODE_DEFAULT)))[-1].usage.cached
    assert generated(worker) == 4
    sampled = gen.StreamGenerateRequest(model=MODEL, prompt="random")
    sampled.sampling.max_tokens = 4
    for _ in range(2):
        await ask(client, sampled)
    assert generated(worker) == 6
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await ask(client, greedy(cache=9))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache" in (bad.value.details() or "")


async def test_the_cache_is_off_unless_the_limits_enable_it(stack: SecurityStack) -> None:
    """Opt-in: a key whose limits do not set response_cache always reaches a worker, and
    an explicit false (the stricter level wins) too."""
    add_keys(stack)
    stack.auth.state.add_key(
        KEY_B, principal("cred-b", user_id="u-b", limits=res.Limits(response_cache=False))
    )
    worker = await stack.add_worker()
    client = stack.client(await router(stack))
    for key in (KEY_OFF, KEY_OFF, KEY_B, KEY_B):
        assert not (await ask(client, greedy(), key))[-1].usage.cached
    assert generated(worker) == 4


async def test_one_tenant_cannot_read_anothers_answer(stack: SecurityStack) -> None:
    """Entries are scoped per user: user B's request identical to user A's is a miss
    that a worker generates (not a fast replay whose timing would tell B that A asked),
    and B's own repeat then hits B's entry. A's second key shares A's entries
    (the scope is the user, not the key)."""
    add_keys(stack)
    worker = await stack.add_worker()
    client = stack.client(await router(stack))
    await ask(client, greedy(), KEY_A)
    assert generated(worker) == 1
    b_first = await ask(client, greedy(), KEY_B)
    assert generated(worker) == 2, "user B was answered from user A's entry"
    assert not b_first[-1].usage.cached
    assert (await ask(client, greedy(), KEY_B))[-1].usage.cached
    assert (await ask(client, greedy(), KEY_A2))[-1].usage.cached
    assert generated(worker) == 2
    # Concurrent: B's first request for another prompt races A's; B still misses.
    await asyncio.gather(ask(client, greedy("race"), KEY_A), ask(client, greedy("race"), KEY_B))
    assert generated(worker) == 4


async def test_another_model_revision_is_a_miss(stack: SecurityStack) -> None:
    """Workers with other weights (another model_revision) never get the old answers;
    the first router's cache is shared, so only the revision tells them apart."""
    add_keys(stack)
    old = await stack.add_worker(model_revision="weights-1")
    first = await router(stack)
    client = stack.client(first)
    await ask(client, greedy())
    assert generated(old) == 1
    new = FakeWorker(type(old.config)(model_revision="weights-2"))
    await new.start()
    stack.workers.append(new)
    second = await router(stack, workers=(new.address,))
    second.core.cache = first.core.cache  # the same store, whichever backend
    answer = await ask(stack.client(second), greedy())
    assert generated(new) == 1 and not answer[-1].usage.cached


async def test_a_hit_counts_as_a_request_of_no_tokens(stack: SecurityStack) -> None:
    """Limits: a hit is one request (requests_per_minute) and settles its token
    reservation to 0 (tokens_per_minute), while a generated answer costs its tokens.
    Usage: a hit records 0 prompt and 0 completion tokens and its cached tokens."""
    tokens = 3 + 6  # the double's prompt (one per word) + max_tokens
    limits = res.Limits(response_cache=True, requests_per_minute=6, tokens_per_minute=tokens + 1)
    add_keys(stack, limits)
    worker = await stack.add_worker()
    app = await router(stack)
    client = stack.client(app)
    await ask(client, greedy())  # tokens used: 9 of 10
    for _ in range(3):  # hits: each admitted (9 < 10) and settled to 0 tokens
        assert (await ask(client, greedy()))[-1].usage.cached
    await ask(client, greedy(cache=gen.CACHE_MODE_BYPASS))  # 18 of 10 now
    with pytest.raises(grpc.aio.AioRpcError) as tpm:
        await ask(client, greedy())
    assert tpm.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert generated(worker) == 2
    await app.core.drain_background()
    records = stack.auth.state.usage.values()
    await eventually(lambda: len(stack.auth.state.usage) == 5, what="5 usage records")
    hits = [r for r in records if r.cached_completion_tokens]
    assert len(hits) == 3
    assert all(r.prompt_tokens == r.completion_tokens == 0 for r in hits)
    assert all(r.cached_completion_tokens == 6 and r.status == "OK" for r in hits)
    misses = [r for r in records if not r.cached_completion_tokens]
    assert [r.completion_tokens for r in misses] == [6, 6]


async def test_requests_per_minute_count_hits(stack: SecurityStack) -> None:
    limits = res.Limits(response_cache=True, requests_per_minute=3)
    add_keys(stack, limits)
    worker = await stack.add_worker()
    client = stack.client(await router(stack))
    for _ in range(3):
        await ask(client, greedy())
    with pytest.raises(grpc.aio.AioRpcError) as rpm:
        await ask(client, greedy())
    assert rpm.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert generated(worker) == 1


async def test_a_cut_stream_is_not_stored(stack: SecurityStack) -> None:
    """A stream that ended early (deadline) leaves no entry: the repeat is generated."""
    add_keys(stack)
    worker = await stack.add_worker(token_delay=0.05)
    client = stack.client(await router(stack))
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        call = client.StreamGenerate(greedy(max_tokens=40), metadata=bearer(KEY_A), timeout=0.3)
        await drain(call)
    assert cut.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await ask(client, greedy(max_tokens=40))
    assert generated(worker) == 2


def test_only_whole_single_worker_answers_are_stored() -> None:
    whole = StreamState(samples_ended=1, finish_reason=gen.FINISH_REASON_LENGTH, revision="r")
    assert complete(whole, 1)
    assert not complete(StreamState(samples_ended=1, finish_reason=2, revision="r"), 2)
    assert not complete(
        StreamState(samples_ended=1, finish_reason=gen.FINISH_REASON_CANCELLED, revision="r"), 1
    )
    assert not complete(StreamState(samples_ended=1, finish_reason=1, revision=""), 1)
    resumed = StreamState(samples_ended=1, finish_reason=1, revision="r", resumed=True)
    assert not complete(resumed, 1)


async def test_entries_expire_after_the_ttl(stack: SecurityStack) -> None:
    """In-process: the LRU's clock is the test's; Redis: the entry carries the TTL."""
    add_keys(stack)
    worker = await stack.add_worker()
    now = [1000.0]
    app = await router(stack, response_cache_ttl=30.0)
    if stack.backend == "local":
        from services.router.response_cache import LocalStore

        assert app.core.cache is not None
        app.core.cache.store = LocalStore(1 << 20, lambda: now[0])
    client = stack.client(app)
    await ask(client, greedy())
    before = generated(worker)
    if stack.backend == "local":
        now[0] += 29.0
        assert (await ask(client, greedy()))[-1].usage.cached
        now[0] += 2.0
        assert not (await ask(client, greedy()))[-1].usage.cached
        assert generated(worker) == before + 1
    else:
        conn = aredis.Redis.from_url(REDIS)
        try:
            keys = await conn.keys(f"{stack.prefix}rc:*")
            assert len(keys) == 1
            assert 0 < await conn.pttl(keys[0]) <= 30_000
        finally:
            await conn.aclose()


async def _hit(client: Any) -> bool:
    return bool((await ask(client, greedy()))[-1].usage.cached)


@pytest.mark.redis
async def test_two_routers_sharing_redis_share_the_cache() -> None:
    """§3: an answer cached through one router hits on another (one Redis), for the
    same user only; the two are reached round-robin, as behind one address."""
    if not router_fixtures.redis_up():
        pytest.skip("Redis is not running on 127.0.0.1:6379")
    s = SecurityStack("redis")
    await s.start_auth()
    try:
        add_keys(s)
        worker = await s.add_worker()
        clients = [s.client(await router(s)), s.client(await router(s))]
        await ask(clients[0], greedy())
        assert await _hit(clients[1]), "router 2 missed router 1's entry"
        assert generated(worker) == 1
        assert not (await ask(clients[1], greedy(), KEY_B))[-1].usage.cached
        answers = await asyncio.gather(*(ask(clients[i % 2], greedy()) for i in range(8)))
        assert all(a[-1].usage.cached for a in answers)
        assert generated(worker) == 2
    finally:
        await s.close()


async def test_the_openai_door_shares_the_cache(stack: SecurityStack) -> None:
    """One code path: a gRPC answer hits over HTTP (whole and streamed), marked
    `cached` in usage; `"cache": "bypass"` reaches the worker."""
    from tests.conftest import free_port

    add_keys(stack)
    worker = await stack.add_worker(tokens_per_message=2)
    app = await router(stack, http_address=f"127.0.0.1:{free_port()}")
    await ask(stack.client(app), greedy())
    body = {"model": MODEL, "prompt": "the same question", "max_tokens": 6, "temperature": 0}

    async def post(**extra: Any) -> tuple[int, str]:
        request = urllib.request.Request(
            f"http://{app.http_address}/v1/completions",
            data=json.dumps({**body, **extra}).encode(),
            headers={"authorization": f"Bearer {KEY_A}", "content-type": "application/json"},
        )

        def call() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(request, timeout=30) as reply:
                    return reply.status, reply.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()

        return await asyncio.to_thread(call)

    status, whole = await post()
    assert status == 200
    usage = json.loads(whole)["usage"]
    assert usage["cached"] and usage["cached_completion_tokens"] == 6
    status, streamed = await post(stream=True, stream_options={"include_usage": True})
    events = [json.loads(line[6:]) for line in streamed.splitlines() if line[6:].startswith("{")]
    assert events[-1]["usage"]["cached"]
    assert (
        "".join(e["choices"][0]["text"] for e in events if e["choices"])
        == json.loads(whole)["choices"][0]["text"]
    )
    assert generated(worker) == 1
    status, bypass = await post(cache="bypass")
    assert "cached" not in json.loads(bypass)["usage"]
    status, bad = await post(cache="sometimes")
    assert status == 400 and "cache" in bad
    assert generated(worker) == 2


async def test_the_python_client_sets_cache_and_reads_cached(stack: SecurityStack) -> None:
    from services.client import Client, Sampling

    add_keys(stack)
    worker = await stack.add_worker()
    app = await router(stack)
    greedy_sampling = Sampling(max_tokens=5, temperature=0.0)
    async with Client(app.address, KEY_A, retries=0) as client:
        first = await client.generate("client question", model=MODEL, sampling=greedy_sampling)
        events = [
            e
            async for e in client.stream_events(
                "client question", model=MODEL, sampling=greedy_sampling
            )
        ]
        bypass = await client.generate(
            "client question", model=MODEL, sampling=greedy_sampling, cache="bypass"
        )
        with pytest.raises(ValueError, match="cache"):
            await client.generate("x", model=MODEL, cache="always")
    assert first.usage is not None and not first.usage.cached
    last = events[-1].usage
    assert last is not None and last.cached and last.cached_completion_tokens == 5
    assert "".join(e.text for e in events) == first.text
    assert bypass.usage is not None and not bypass.usage.cached
    assert generated(worker) == 2


async def test_with_redis_down_the_cache_misses_and_generation_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis unreachable: every request is generated (no error reaches the caller), and
    the outage is logged once."""
    s = SecurityStack("local")
    await s.start_auth()
    try:
        add_keys(s)
        worker = await s.add_worker()
        client = s.client(await router(s, redis_url="redis://127.0.0.1:1/0"))
        for _ in range(3):
            assert not (await ask(client, greedy()))[-1].usage.cached
        assert generated(worker) == 3
    finally:
        await s.close()
    outages = [r for r in caplog.records if "response cache: redis unreachable" in r.message]
    assert len(outages) == 1
