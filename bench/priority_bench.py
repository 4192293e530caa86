"""Benchmark priority, preemption and per-tenant fairness on one engine, same run.

The engine serves the demo model (or --model) with the worker's thread layout.
Every figure is a ratio against a baseline measured in the same run:

1. High-priority TTFT: `--probes` priority-5 requests on the idle engine, one at a
   time (the baseline), against the high-priority requests of (3).
2. Low-priority throughput, saturated (the baseline): `--low` priority-0 requests
   kept `slots + 4 x slots` outstanding (the queue at least 4x the slots), each
   finished one replaced at once.
3. The same with 10 % high priority: one priority-5 request per 9 low ones, sent
   at even intervals over the run (open loop, so each arrives at a full worker);
   it preempts a running low one. Reported: the high requests' TTFT p50
   against (1) (target <= 1.5x), and the low requests' tokens/s against (2)
   (target: drop <= 15 %).
4. Two tenants submitting at 10:1 (40 and 4 requests outstanding, both always
   queued) for `--window` seconds: each tenant's tokens/s (target: within 20 %),
   and the same load with the tenant left unset (first-come, the old order).

    .venv/bin/python bench/priority_bench.py            # demo model
    .venv/bin/python bench/priority_bench.py --quick    # fewer requests, shorter window
    .venv/bin/python bench/priority_bench.py --model tiny   # random 4-layer model

Each side of a ratio runs in the same process, rounds alternating their order; on a
shared machine the throughput ratio still moves with other processes' load (run it
on a quiet one), while the two tenants run at once and so compare cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.inference.engine import Engine, EngineRequest, Sampling
from services.inference.engine.threads import confine_torch_threads
from services.inference.model_loading import load_model

PROMPT = (
    "You are a careful assistant. Summarise, for a colleague who missed it, the "
    "meeting in which the team agreed on a plan, assigned owners and set a date."
)
HIGH = 5
Prompts = Callable[[int], list[int]]  # request number -> its prompt's token ids


@dataclasses.dataclass
class Done:
    """One finished request: its priority, tenant, TTFT and tokens, and when it ended."""

    priority: int
    tenant: str
    ttft: float
    tokens: int
    ended: float


async def run_one(engine: Engine, req: EngineRequest) -> Done:
    """Stream one request to its end."""
    started = time.perf_counter()
    ttft = 0.0
    tokens = 0
    async for batch in engine.generate(req):
        produced = sum(1 for e in batch if e.token_id >= 0)
        if produced and not tokens:
            ttft = time.perf_counter() - started
        tokens += produced
    return Done(req.priority, req.tenant, ttft, tokens, time.perf_counter())


_numbers = itertools.count()


def request(
    prompt: Prompts, sampling: Sampling, priority: int = 0, tenant: str = ""
) -> EngineRequest:
    """The workload's next request: a prompt and a seed of its own."""
    i = next(_numbers)
    return EngineRequest(
        f"r{i}",
        prompt(i),
        dataclasses.replace(sampling, seed=i),
        priority=priority,
        tenant=tenant,
    )


async def idle_ttft(engine: Engine, prompt: Prompts, sampling: Sampling, probes: int) -> float:
    """Median TTFT of high-priority requests, one at a time on the idle engine."""
    runs = [await run_one(engine, request(prompt, sampling, HIGH)) for _ in range(probes)]
    return float(statistics.median(r.ttft for r in runs))


async def saturated(
    engine: Engine,
    prompt: Prompts,
    sampling: Sampling,
    *,
    low: int,
    outstanding: int,
    high_gap: float | None,
) -> tuple[list[Done], float]:
    """`low` low-priority requests kept `outstanding`; with `high_gap`, one high-priority
    request per 9 low ones, submitted every `high_gap` seconds (open loop, so they
    arrive at a full worker rather than just as a slot frees)."""
    gate = asyncio.Semaphore(outstanding)
    tasks: list[asyncio.Task[Done]] = []

    async def one(req: EngineRequest) -> Done:
        try:
            return await run_one(engine, req)
        finally:
            gate.release()

    async def highs(count: int, gap: float) -> list[Done]:
        runs: list[asyncio.Task[Done]] = []
        for _ in range(count):
            await asyncio.sleep(gap)
            req = request(prompt, sampling, HIGH)
            runs.append(asyncio.create_task(run_one(engine, req)))
        return list(await asyncio.gather(*runs))

    started = time.perf_counter()
    high_task = None
    if high_gap is not None:
        high_task = asyncio.create_task(highs(low // 9, high_gap))
    for _ in range(low):
        await gate.acquire()
        tasks.append(asyncio.create_task(one(request(prompt, sampling))))
    done = list(await asyncio.gather(*tasks))
    if high_task is not None:
        done += await high_task
    return done, time.perf_counter() - started


async def tenants(
    engine: Engine,
    prompt: Prompts,
    sampling: Sampling,
    *,
    window: float,
    named: bool,
) -> dict[str, float]:
    """Tokens/s of two tenants keeping 40 and 4 requests outstanding for `window` s."""
    tokens = {"heavy": 0, "light": 0}
    stop = asyncio.Event()
    started = time.perf_counter()

    async def stream(req: EngineRequest, who: str) -> None:
        stream = engine.generate(req)
        try:
            async for batch in stream:
                if stop.is_set():
                    break
                tokens[who] += sum(1 for e in batch if e.token_id >= 0)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def tenant(who: str, outstanding: int) -> None:
        gate = asyncio.Semaphore(outstanding)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            gate.release()
            running.discard(task)

        while not stop.is_set():
            await gate.acquire()
            if stop.is_set():
                break
            req = request(prompt, sampling, 0, who if named else "")
            task = asyncio.create_task(stream(req, who))
            task.add_done_callback(finished)
            running.add(task)
        await asyncio.gather(*running, return_exceptions=True)

    loops = [
        asyncio.create_task(tenant("heavy", 40)),
        asyncio.create_task(tenant("light", 4)),
    ]
    await asyncio.sleep(window)
    stop.set()
    elapsed = time.perf_counter() - started
    await asyncio.gather(*loops)
    await engine.wait_idle()
    return {who: n / elapsed for who, n in tokens.items()}


def p50(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


async def bench(args: argparse.Namespace) -> None:
    threads = confine_torch_threads()
    if args.model == "tiny":  # the tests' random-weight model: scheduling, not the model
        from tests.doubles.tiny_model import build_tiny_model

        loaded = build_tiny_model(num_layers=4, hidden_size=256)
    else:
        loaded = load_model(args.model, device="cpu", dtype=args.dtype, cache_dir=args.cache_dir)
    tokenizer = loaded.tokenizer

    def prompt(i: int) -> list[int]:
        # Each request its own prompt: no request's prefill comes from another's cache.
        return list(tokenizer(f"Ticket {i}. {PROMPT}")["input_ids"])

    slots = args.slots
    engine = Engine(
        loaded,
        max_running=slots,
        max_queued=64,
        max_batch_tokens=args.max_batch_tokens,
        compute_threads=threads,
    )
    engine.start(warm=True)
    sampling = Sampling(max_tokens=args.new_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)
    outstanding = slots + 4 * slots

    def phase(name: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    idle: list[float] = []
    base: list[Done] = []
    mixed: list[Done] = []
    base_s = mixed_s = 0.0
    preemptions = 0
    try:
        phase("warm-up")
        await idle_ttft(engine, prompt, sampling, 2)  # warm the shapes
        gap: float | None = None
        for round_ in range(args.rounds):
            phase(f"round {round_ + 1}: idle high-priority probes")
            idle.append(await idle_ttft(engine, prompt, sampling, args.probes))
            # Alternate the order: a load spike from elsewhere hits both sides alike.
            for with_high in (False, True) if round_ % 2 == 0 else (True, False):
                # (Round 1 runs its baseline first: that sets the high requests' spacing.)
                phase(f"round {round_ + 1}: saturated, {'10% high' if with_high else 'low only'}")
                before = engine.stats().total_preemptions
                done, seconds = await saturated(
                    engine, prompt, sampling, low=args.low, outstanding=outstanding,
                    high_gap=gap if with_high else None,
                )  # fmt: skip
                if with_high:
                    mixed += done
                    mixed_s += seconds
                    preemptions += engine.stats().total_preemptions - before
                else:
                    base += done
                    base_s += seconds
                    # Spread the high requests over the first 80 % of a run.
                    gap = 0.8 * seconds / (args.low // 9 + 1)
        phase("two tenants at 10:1")
        fair = await tenants(engine, prompt, sampling, window=args.window, named=True)
        phase("the same, first-come")
        fifo = await tenants(engine, prompt, sampling, window=args.window, named=False)
    finally:
        await engine.stop()
    idle_p50 = p50(idle)

    base_tps = sum(d.tokens for d in base) / base_s
    mixed_low = [d for d in mixed if d.priority == 0]
    mixed_high = [d for d in mixed if d.priority == HIGH]
    mixed_tps = sum(d.tokens for d in mixed_low) / mixed_s
    high_ttft = p50([d.ttft for d in mixed_high])
    low_ttft = p50([d.ttft for d in mixed_low])
    print(
        f"model {loaded.name} ({loaded.dtype}), {slots} slots, "
        f"max_batch_tokens {args.max_batch_tokens}, prompt {len(prompt(0))} tokens, "
        f"{args.new_tokens} new tokens per request, {outstanding} outstanding "
        f"(queue {outstanding - slots} = {(outstanding - slots) // slots}x slots)"
    )
    print(f"{'':44} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    rows = [
        ("high-priority TTFT p50, saturated (ms)", 1000 * high_ttft, 1000 * idle_p50, "<= 1.5"),
        ("low-priority tokens/s with 10% high", mixed_tps, base_tps, ">= 0.85"),
        ("tenant tokens/s light vs heavy (10:1 load)", fair["light"], fair["heavy"], "0.8-1.25"),
        ("  same load, no tenant (first-come)", fifo["light"], fifo["heavy"], "(before)"),
    ]
    for name, value, baseline, target in rows:
        print(f"{name:44} {value:10.1f} {baseline:10.1f} {value / baseline:7.2f} {target:>8}")
    print(
        f"high requests {len(mixed_high)} of {len(mixed)} "
        f"({100 * len(mixed_high) / len(mixed):.0f}%), "
        f"preemptions {preemptions}; low-priority TTFT p50 {1000 * low_ttft:.0f} ms; "
        f"heavy/light tokens/s {fair['heavy']:.1f}/{fair['light']:.1f} "
        f"(first-come {fifo['heavy']:.1f}/{fifo['light']:.1f})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="a model, or 'tiny' (random weights, fast)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/tokenyard/models")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument(
        "--max-batch-tokens", type=int, default=512, help="the worker's step budget (default)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--low", type=int, default=90, help="low-priority requests per run")
    parser.add_argument("--rounds", type=int, default=2, help="baseline and mixed runs each")
    parser.add_argument("--probes", type=int, default=7, help="idle high-priority requests")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of two-tenant load")
    parser.add_argument("--quick", action="store_true", help="45 low requests, 8 s windows")
    args = parser.parse_args(argv)
    if args.quick:
        args.low, args.window, args.probes, args.rounds = 45, 8.0, 5, 1
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
