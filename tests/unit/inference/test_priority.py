"""Priority, preemption and per-tenant fairness in the engine's scheduler.

The scheduler is driven step by step here (no compute thread), so "within one
step" is exact; the engine-level tests check shedding through `Engine.generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from services.inference.engine import EngineSaturated, Sampling
from services.inference.engine.generic import select_runner
from services.inference.engine.prefix_cache import PrefixCache
from services.inference.engine.scheduler import Scheduler
from services.inference.engine.sequence import Sequence
from services.inference.engine.types import EngineRequest, TokenEvent
from services.inference.model_loading import LoadedModel
from tests.unit.inference.conftest import EngineFactory
from tests.unit.inference.helpers import collect

pytestmark = pytest.mark.timeout(120)
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
SEEDED: dict[str, Any] = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "ignore_eos": True}


class Harness:
    """A scheduler over the tiny model, its events collected per sequence."""

    def __init__(self, tiny: LoadedModel, *, max_running: int, prefix_cache: bool = True) -> None:
        self.events: dict[int, list[TokenEvent]] = {}
        self.finished: list[Sequence] = []
        self.sched = Scheduler(
            select_runner(tiny.model, take_weights=False),
            max_running=max_running,
            max_batch_tokens=256,
            context_length=tiny.context_length,
            eos_token_ids=tiny.eos_token_ids,
            prefix_cache=PrefixCache(16, 64 * 2**20) if prefix_cache else None,
            deliver=self._deliver,
            on_removed=lambda seq: None,
        )
        self.now = 0.0

    def _deliver(self, batch: list[tuple[Sequence, list[TokenEvent]]]) -> None:
        for seq, events in batch:
            self.events.setdefault(id(seq), []).extend(events)
            if any(e.finish is not None for e in events):
                self.finished.append(seq)

    def add(
        self,
        prompt: list[int],
        *,
        max_tokens: int,
        priority: int = 0,
        tenant: str = "",
        n: int = 1,
        **sampling: Any,
    ) -> list[Sequence]:
        """Queue a request the way the engine does (sample 0 carries its forks)."""
        req = EngineRequest(
            "r",
            prompt,
            Sampling(max_tokens=max_tokens, **sampling),
            n=n,
            priority=priority,
            tenant=tenant,
        )
        seed = sampling.get("seed") or 0
        seqs = [Sequence.create(req, seed + i, None, index=i) for i in range(n)]
        seqs[0].forks = seqs[1:]
        self.sched.add(seqs[0])
        return seqs

    def step(self) -> None:
        self.now += 0.01
        self.sched.step(self.now)

    def run(self) -> None:
        for _ in range(2000):
            if not self.sched.has_work():
                return
            self.step()
        raise AssertionError("the scheduler did not finish")

    def tokens(self, seq: Sequence) -> list[int]:
        return [e.token_id for e in self.events.get(id(seq), []) if e.token_id >= 0]


def alone(tiny: LoadedModel, prompt: list[int], max_tokens: int, n: int = 1, **kw: Any) -> Any:
    """The tokens of each sample of one request run by itself (the reference)."""
    h = Harness(tiny, max_running=4)
    seqs = h.add(prompt, max_tokens=max_tokens, n=n, **kw)
    h.run()
    return [h.tokens(s) for s in seqs]


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_high_priority_preempts_at_once_and_preempted_streams_resume_identical(
    tiny: LoadedModel, prompts: list[list[int]], sampling: dict[str, Any]
) -> None:
    h = Harness(tiny, max_running=2)
    low = [h.add(prompts[i], max_tokens=30, **sampling)[0] for i in (1, 4)]
    for _ in range(6):
        h.step()
    assert all(s.generated == 6 for s in low)
    (high,) = h.add(prompts[2], max_tokens=8, priority=5, **sampling)
    h.step()  # the very next step: a low sequence is paused, the high one prefilled
    assert high.slot >= 0 and high.generated == 1
    assert h.sched.total_preemptions == 1
    paused = [s for s in low if s.slot < 0]
    assert len(paused) == 1 and paused[0] in list(h.sched.waiting)
    assert paused[0].generated == 6  # paused, not failed: no finish event
    assert all(e.finish is None for e in h.events[id(paused[0])])
    h.run()
    assert h.finished[0] is high  # it ran to its end before the paused one resumed
    for i, seq in zip((1, 4), low, strict=True):
        assert h.tokens(seq) == alone(tiny, prompts[i], 30, **sampling)[0]
    assert h.tokens(high) == alone(tiny, prompts[2], 8, **sampling)[0]


def test_preempted_sample_of_an_n_request_resumes_identical(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    h = Harness(tiny, max_running=3)
    samples = h.add(prompts[4], max_tokens=24, n=3, **SEEDED)
    for _ in range(5):
        h.step()
    (high,) = h.add(prompts[0], max_tokens=6, priority=1, **GREEDY)
    h.step()
    assert high.slot >= 0 and h.sched.total_preemptions == 1
    h.run()
    assert [h.tokens(s) for s in samples] == alone(tiny, prompts[4], 24, n=3, **SEEDED)


def test_no_preemption_for_equal_or_lower_priority(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    h = Harness(tiny, max_running=1)
    (first,) = h.add(prompts[1], max_tokens=10, priority=2, **GREEDY)
    h.step()
    h.add(prompts[2], max_tokens=4, priority=2, **GREEDY)
    h.add(prompts[3], max_tokens=4, priority=-1, **GREEDY)
    h.run()
    assert h.sched.total_preemptions == 0
    assert h.finished[0] is first


def test_queue_serves_higher_priority_first_then_arrival(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    h = Harness(tiny, max_running=1)
    (busy,) = h.add(prompts[0], max_tokens=3, priority=9, **GREEDY)
    h.step()
    low_a = h.add(prompts[1], max_tokens=2, **GREEDY)[0]
    low_b = h.add(prompts[2], max_tokens=2, **GREEDY)[0]
    high = h.add(prompts[3], max_tokens=2, priority=3, **GREEDY)[0]
    shed = h.add(prompts[5], max_tokens=2, priority=-2, **GREEDY)[0]
    h.run()
    assert h.finished == [busy, high, low_a, low_b, shed]


def test_tenants_take_turns_one_with_many_queued_does_not_starve_one_with_one(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    h = Harness(tiny, max_running=1)
    a = [h.add(prompts[i % 8], max_tokens=2, tenant="user-a", **GREEDY)[0] for i in range(20)]
    (b,) = h.add(prompts[3], max_tokens=2, tenant="user-b", **GREEDY)
    h.run()
    order = h.finished
    assert order.index(b) <= 1  # after at most one of A's, never behind most of them
    assert [s for s in order if s is not b] == a  # A's own keep their arrival order


def test_backlogged_tenants_alternate_whatever_they_submitted(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    h = Harness(tiny, max_running=2)
    for i in range(20):
        h.add(prompts[1], max_tokens=4, tenant="heavy", **GREEDY)
        if i % 10 == 0:
            h.add(prompts[1], max_tokens=4, tenant="light", **GREEDY)
    h.run()
    first_four = [s.tenant for s in h.finished[:4]]
    assert sorted(first_four) == ["heavy", "heavy", "light", "light"]


async def test_sheddable_request_refused_while_saturated_and_admitted_when_idle(
    make_engine: EngineFactory, prompts: list[list[int]]
) -> None:
    engine = make_engine(max_running=2, max_queued=8)
    shed = EngineRequest("s", prompts[0], Sampling(max_tokens=4, **GREEDY), priority=-1)
    events = await collect(engine, shed)  # idle: admitted
    assert [e.finish for e in events][-1] == "length"
    long = EngineRequest("l", prompts[1], Sampling(max_tokens=400, **GREEDY))
    busy = [engine.generate(dataclasses.replace(long, request_id=str(i))) for i in range(2)]
    with pytest.raises(EngineSaturated):  # every slot taken: refused, not queued
        engine.generate(shed)
    queued = engine.generate(dataclasses.replace(shed, priority=0))  # priority 0 queues
    assert engine.stats().queued >= 1
    for stream in [*busy, queued]:
        await stream.aclose()  # type: ignore[attr-defined]


def test_preemption_on_the_generic_path_resumes_identical(
    tiny: LoadedModel, prompts: list[list[int]]
) -> None:
    from tests.unit.inference.families import build_family

    model = build_family("gpt2", tiny.tokenizer, seed=3)
    h = Harness(model, max_running=1, prefix_cache=False)
    assert h.sched.runner.path == "generic"
    (low,) = h.add(prompts[1], max_tokens=16, **GREEDY)
    for _ in range(4):
        h.step()
    (high,) = h.add(prompts[2], max_tokens=4, priority=1, **GREEDY)
    h.step()
    assert high.slot == 0 and low.slot < 0
    h.run()
    reference = Harness(model, max_running=1, prefix_cache=False)
    (alone_low,) = reference.add(prompts[1], max_tokens=16, **GREEDY)
    reference.run()
    assert h.tokens(low) == reference.tokens(alone_low)
