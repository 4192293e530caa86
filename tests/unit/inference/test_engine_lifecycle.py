"""Slots, queue limits, cancellation, deadlines, drain, stop, prefix cache and stats."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest
import torch

from services.inference.engine import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    NO_TOKEN,
    Engine,
    EngineClosed,
    EngineFull,
    InvalidRequest,
    TokenEvent,
)
from services.inference.engine.engine import MIN_KV_POSITIONS
from services.inference.engine.runner import Runner
from services.inference.model_loading import LoadedModel
from tests.conftest import eventually
from tests.unit.inference.conftest import EngineFactory
from tests.unit.inference.helpers import collect, hf_greedy, request

pytestmark = pytest.mark.timeout(60)
ENDLESS = {"max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


async def wait_for(predicate: Callable[[], bool]) -> None:
    await eventually(predicate, interval=0.002)


async def test_closing_the_stream_frees_the_slot(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=2)
    stream = engine.generate(request(prompts[0], **ENDLESS))  # type: ignore[arg-type]
    first = await anext(stream)
    assert first[0].token_id != NO_TOKEN
    assert engine.stats().running == 1
    await stream.aclose()  # type: ignore[attr-defined]
    started = engine.stats().total_steps
    await wait_for(lambda: engine.stats().running == 0)
    assert engine.stats().total_steps - started <= 2  # freed at the next step boundary
    assert engine.stats().total_cancelled == 1
    assert engine.stats().free_slots == 2


async def test_cancelling_the_consumer_task_frees_the_slot(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    got: list[TokenEvent] = []

    async def consume() -> None:
        async for batch in engine.generate(request(prompts[1], **ENDLESS)):  # type: ignore[arg-type]
            got.extend(batch)

    task = asyncio.create_task(consume())
    await wait_for(lambda: len(got) >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: engine.stats().running == 0 and engine.stats().queued == 0)


async def test_engine_full_when_queue_is_full(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=1, max_queued=1, max_batch_tokens=16, start=False)
    first = engine.generate(request(prompts[0], "a", max_tokens=3))
    second = engine.generate(request(prompts[1], "b", max_tokens=3))
    with pytest.raises(EngineFull):
        engine.generate(request(prompts[2], "c"))
    assert engine.stats().queued == 2
    engine.start()
    for stream in (first, second):
        events = [e async for batch in stream for e in batch]
        assert len(events) >= 1 and events[-1].finish is not None
    await engine.wait_idle()
    third = await collect(engine, request(prompts[2], "c", max_tokens=2))  # room again
    assert third[-1].finish is not None


async def test_deadline_cancels_the_request(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    req = request(prompts[0], **ENDLESS)  # type: ignore[arg-type]
    req.deadline = time.monotonic() + 0.02  # far less than 400 steps take
    events = await collect(engine, req)
    assert events[-1].finish == FINISH_CANCELLED and events[-1].token_id == NO_TOKEN
    assert len(events) < 400
    await engine.wait_idle()
    assert engine.stats().running == 0 and engine.stats().total_cancelled == 1
    expired = request(prompts[1], **ENDLESS)  # type: ignore[arg-type]
    expired.deadline = time.monotonic() - 1.0
    assert [e.finish for e in await collect(engine, expired)] == [FINISH_CANCELLED]


async def test_stop_cancels_running_and_queued(tiny: LoadedModel, prompts: list[list[int]]) -> None:
    engine = Engine(tiny, max_running=1, max_queued=2, max_batch_tokens=16)
    engine.start()
    running = engine.generate(request(prompts[0], "a", **ENDLESS))  # type: ignore[arg-type]
    queued = engine.generate(request(prompts[1], "b", **ENDLESS))  # type: ignore[arg-type]
    await anext(running)
    await engine.stop()
    rest = [e async for batch in running for e in batch]
    assert rest[-1].finish == FINISH_CANCELLED
    waiting = [e async for batch in queued for e in batch]
    assert [e.finish for e in waiting] == [FINISH_CANCELLED]
    with pytest.raises(EngineClosed):
        engine.generate(request(prompts[0]))


async def test_wait_idle_waits_for_running_requests(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    await asyncio.wait_for(engine.wait_idle(), 1.0)  # idle from the start
    task = asyncio.create_task(
        collect(engine, request(prompts[0], max_tokens=400, ignore_eos=True))
    )
    await wait_for(lambda: engine.stats().running == 1)
    idle = asyncio.create_task(engine.wait_idle())
    await asyncio.sleep(0)  # wait_idle starts waiting
    assert engine.stats().running == 1 and not idle.done()
    await asyncio.wait_for(idle, 10.0)
    assert task.done() and len(task.result()) == 400


async def test_prefix_cache_reuses_and_keeps_output(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    system = prompts[7]  # a shared "system prompt" of several blocks
    first = system + prompts[0]
    second = system + prompts[2]
    cached = make_engine(prefix_block_size=8)
    uncached = make_engine(prefix_cache=False)
    for prompt in (first, second):
        with_cache = await collect(cached, request(prompt, temperature=0.0))
        without = await collect(uncached, request(prompt, temperature=0.0))
        assert [e.token_id for e in with_cache] == [e.token_id for e in without]
        assert [e.token_id for e in with_cache] == hf_greedy(tiny, prompt, 12)
    stats = cached.stats()
    assert stats.prefix_cache_queries == 2
    assert stats.prefix_cache_hits == 1
    assert stats.prefix_cache_reused_tokens >= len(system) - 8
    assert with_cache[0].cached_prompt_tokens == stats.prefix_cache_reused_tokens
    assert all(e.cached_prompt_tokens == 0 for e in with_cache[1:])
    assert uncached.stats().prefix_cache_hits == 0


async def test_prefix_cache_serves_a_follow_up_turn(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine(prefix_block_size=4)
    turn1 = prompts[4]
    answer = [e.token_id for e in await collect(engine, request(turn1, temperature=0.0))]
    turn2 = turn1 + answer + prompts[2]
    events = await collect(engine, request(turn2, temperature=0.0))
    # The earlier prompt and the generated answer (but its last token) were cached.
    assert events[0].cached_prompt_tokens >= len(turn1) + len(answer) - 1 - 4
    assert [e.token_id for e in events] == hf_greedy(tiny, turn2, 12)


async def test_stats_count_tokens(make_engine: EngineFactory, prompts: list[list[int]]) -> None:
    engine = make_engine()
    await asyncio.gather(
        *(
            collect(engine, request(p, str(i), max_tokens=10, ignore_eos=True))
            for i, p in enumerate(prompts[:4])
        )
    )
    await engine.wait_idle()
    stats = engine.stats()
    assert stats.total_requests == 4 and stats.total_finished == 4
    assert stats.total_generated_tokens == 40
    assert stats.total_prompt_tokens == sum(len(p) for p in prompts[:4])
    assert stats.tokens_per_second > 0
    assert stats.running == 0 and stats.queued == 0 and stats.pending_tokens == 0


async def test_warmup_then_generate(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine(start=False)
    engine.warmup()
    engine.start()
    events = await collect(engine, request(prompts[1], temperature=0.0))
    assert [e.token_id for e in events] == hf_greedy(tiny, prompts[1], 12)


async def test_kv_cache_grows_for_long_sequences_and_shrinks_when_idle(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    engine = make_engine()
    idle_bytes = engine.stats().kv_cache_bytes
    long_prompt = (prompts[7] * 8)[:280]  # grows the cache several times past its initial size
    events = await collect(engine, request(long_prompt, temperature=0.0, max_tokens=12))
    assert [e.token_id for e in events] == hf_greedy(tiny, long_prompt, 12)
    await engine.wait_idle()
    assert engine.stats().kv_cache_bytes == idle_bytes
    assert engine.stats().total_steps > 0


def test_the_cache_holds_slots_as_asked_and_keeps_what_they_hold(tiny: LoadedModel) -> None:
    runner = Runner(tiny.model)
    per_position = runner.kv_bytes_per_position()
    cache = runner.new_cache(64, 64, held=1)
    assert cache.nbytes() == per_position * 64  # one slot of 64 positions, not 64 slots
    torch.manual_seed(0)
    cache.k[:, 0].normal_()
    cache.v[:, 0].normal_()
    k0, v0 = cache.k[:, 0].clone(), cache.v[:, 0].clone()
    cache.ensure_slots(3)
    assert cache.nbytes() == per_position * 64 * 3
    assert torch.equal(cache.k[:, 0], k0) and torch.equal(cache.v[:, 0], v0)
    assert not cache.k[:, 1:].any() and not cache.v[:, 1:].any()
    cache.ensure_capacity(100, 1000)  # grows the slots held, keeps their positions
    assert cache.capacity >= 100 and cache.k.shape[1] == 3
    assert torch.equal(cache.k[:, 0, :, :64], k0) and not cache.k[:, 0, :, 64:].any()
    cache.ensure_slots(4)
    assert cache.k.shape[1] == 6  # twice as many, so n arrivals cost log n copies
    cache.ensure_slots(64)
    assert cache.k.shape[1] == 64
    with pytest.raises(ValueError, match="slot 64 asked of a cache of 64 slots"):
        cache.ensure_slots(65)


async def test_one_stream_on_a_many_slot_engine_holds_one_slot(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    slots = 32
    engine = make_engine(max_running=slots)
    per_position = Runner(tiny.model).kv_bytes_per_position()
    long_prompt = (prompts[7] * 8)[:200]  # past the initial capacity: the cache grows
    seen = []
    async for _ in engine.generate(request(long_prompt, temperature=0.0, max_tokens=12)):
        seen.append(engine.stats().kv_cache_bytes)
    assert max(seen) >= per_position * 200  # the one sequence's positions
    assert max(seen) < per_position * slots * 64  # far less than every slot at 64


async def test_kv_cache_budget_caps_the_context_and_the_cache(
    make_engine: EngineFactory, tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    slots, positions = 4, 96
    per_position = Runner(tiny.model).kv_bytes_per_position()
    budget = per_position * slots * positions + per_position - 1  # a partial position is unused
    engine = make_engine(max_running=slots, kv_cache_bytes=budget)
    assert engine.context_length == positions < tiny.context_length
    # Every slot runs to the capped context: the cache never outgrows the budget.
    events = await asyncio.gather(
        *(
            collect(engine, request(prompts[i], f"r{i}", max_tokens=400, ignore_eos=True))
            for i in range(slots)
        )
    )
    for i, got in enumerate(events):
        assert got[-1].finish == FINISH_LENGTH
        assert len(prompts[i]) + len(got) == positions
    assert engine.stats().kv_cache_bytes <= budget
    with pytest.raises(InvalidRequest) as caught:
        engine.generate(request([1] * positions))
    assert caught.value.field == "prompt_ids"


def test_kv_cache_budget_too_small_for_any_context(tiny: LoadedModel) -> None:
    per_position = Runner(tiny.model).kv_bytes_per_position()
    with pytest.raises(ValueError, match=r"max_running=8.*lower max_running"):
        Engine(
            tiny,
            max_running=8,
            max_queued=0,
            max_batch_tokens=64,
            kv_cache_bytes=per_position * 8 * (MIN_KV_POSITIONS - 1),
        )


async def test_a_request_holding_its_last_event_is_no_longer_counted(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    # WatchLoad and the metrics read these counts; a finished request must not show
    # as running or queued to a caller that already has its final event.
    engine = make_engine(max_running=2)
    for i in range(30):
        events = await collect(engine, request(prompts[i % 8], f"r{i}", max_tokens=1))
        assert events[-1].finish is not None
        stats = engine.stats()
        assert (stats.running, stats.queued) == (0, 0), f"request {i}"


async def test_first_event_says_when_the_request_got_a_slot(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=1)
    submitted = time.monotonic()
    first_seen: dict[str, float] = {}
    admitted: dict[str, float | None] = {}

    async def run(name: str, prompt: list[int]) -> None:
        first = True
        async for batch in engine.generate(request(prompt, name, max_tokens=20, ignore_eos=True)):
            if first:
                first_seen[name] = time.monotonic()
                admitted[name] = batch[0].admitted_at
                first = False
            assert all(e.admitted_at is None for e in batch[1:])

    await asyncio.gather(run("a", prompts[0]), run("b", prompts[1]))
    a, b = admitted["a"], admitted["b"]
    assert a is not None and b is not None
    assert submitted <= a <= first_seen["a"]
    # One slot: b waited while a generated, so it was admitted after a's first token.
    assert first_seen["a"] < b <= first_seen["b"]


async def test_a_warm_start_warms_up_on_the_compute_thread(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(start=False)
    warmed_on: list[str] = []
    warmup = engine.warmup

    def recording_warmup() -> None:
        warmed_on.append(threading.current_thread().name)
        warmup()

    engine.warmup = recording_warmup  # type: ignore[method-assign]
    await asyncio.to_thread(engine.start, warm=True)
    assert warmed_on == [f"engine-{engine.loaded.name}"]  # done before start returned
    events = await collect(engine, request(prompts[1], temperature=0.0, max_tokens=4))
    assert len(events) == 4


async def test_a_failed_warm_up_is_raised_by_start(make_engine: EngineFactory) -> None:
    engine = make_engine(start=False)

    def broken_warmup() -> None:
        raise RuntimeError("kernel setup failed")

    engine.warmup = broken_warmup  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="kernel setup failed"):
        await asyncio.to_thread(engine.start, warm=True)
    with pytest.raises(EngineClosed):
        engine.generate(request([1, 2, 3]))
