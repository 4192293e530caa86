"""Benchmark `n` samples: one request of n=4 against four n=1 requests, same run.

The engine serves the demo model (or --model) with the worker's thread layout and
the prefix cache off, so the baseline's four requests cannot share their prompt
through it and the n=4 request shares it only by forking its prefill. Each round
runs, on one long prompt with a fresh seed: (a) one n=1 request alone (the TTFT
baseline), (b) one request of n=4, (c) four n=1 requests submitted together with
seeds seed..seed+3 (the same samples (b) produces). Prints medians over the rounds
and the ratios the issue asks for: TTFT(n=4) / TTFT(n=1 alone) (prefill once: at
most 1.2) and tok/s(n=4) / tok/s(4 x n=1) (at least 1), plus prompt tokens prefilled.

    .venv/bin/python bench/samples_bench.py            # 5 rounds, 64 new tokens
    .venv/bin/python bench/samples_bench.py --quick    # 3 rounds, 32 new tokens
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.inference.engine import Engine, EngineRequest, Sampling
from services.inference.engine.threads import confine_torch_threads
from services.inference.model_loading import load_model

PROMPT = (
    "You are a careful assistant. Read the following notes and then write a short, "
    "friendly summary for a colleague who missed the meeting. "
) + " ".join(
    f"Note {i}: the team discussed item {i}, agreed on a plan, and assigned an owner "
    "who will report back next week with the numbers and a short demo."
    for i in range(12)
)


@dataclasses.dataclass
class Run:
    """One measured request set: first-token latency, tokens and wall time."""

    ttft: float
    tokens: int
    seconds: float
    prefilled: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


async def measure(engine: Engine, requests: list[EngineRequest]) -> Run:
    """Submit `requests` together; time to the first token of any, and to the end."""
    before = engine.stats().total_prefill_tokens
    started = time.perf_counter()
    first: list[float] = []
    tokens = 0

    async def one(req: EngineRequest) -> None:
        nonlocal tokens
        async for batch in engine.generate(req):
            produced = sum(1 for e in batch if e.token_id >= 0)
            if produced and not first:
                first.append(time.perf_counter() - started)
            tokens += produced

    await asyncio.gather(*(one(r) for r in requests))
    seconds = time.perf_counter() - started
    return Run(first[0], tokens, seconds, engine.stats().total_prefill_tokens - before)


async def bench(args: argparse.Namespace) -> None:
    threads = confine_torch_threads()
    loaded = load_model(args.model, device="cpu", dtype=args.dtype, cache_dir=args.cache_dir)
    prompt = list(loaded.tokenizer(PROMPT)["input_ids"])
    engine = Engine(
        loaded,
        max_running=8,
        max_queued=8,
        max_batch_tokens=1024,
        prefix_cache=False,
        compute_threads=threads,
    )
    engine.start(warm=True)
    sampling = Sampling(max_tokens=args.new_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)

    def req(seed: int, n: int = 1) -> EngineRequest:
        return EngineRequest(f"r{seed}", prompt, dataclasses.replace(sampling, seed=seed), n=n)

    alone: list[Run] = []
    grouped: list[Run] = []
    separate: list[Run] = []
    try:
        await measure(engine, [req(0, 4)])  # warm the shapes of both sides
        await measure(engine, [req(i) for i in range(4)])
        for round_ in range(args.rounds):
            seed = 1000 * (round_ + 1)
            # Alternate the order: a load spike from elsewhere hits each side alike.
            sides = [
                (alone, [req(seed)]),
                (grouped, [req(seed, 4)]),
                (separate, [req(seed + i) for i in range(4)]),
            ]
            for runs, requests in sides if round_ % 2 == 0 else reversed(sides):
                runs.append(await measure(engine, requests))
    finally:
        await engine.stop()

    def med(runs: list[Run], key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in runs))

    print(f"model {loaded.name} ({loaded.dtype}), prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens per sample, {args.rounds} rounds (medians)")  # fmt: skip
    rows = [("n=1 alone", alone), ("n=4 (one request)", grouped), ("4 x n=1 together", separate)]
    print(f"{'':22} {'TTFT ms':>9} {'tok/s':>8} {'prefilled':>10}")
    for name, runs in rows:
        print(
            f"{name:22} {1000 * med(runs, 'ttft'):9.1f} {med(runs, 'tok_s'):8.1f} "
            f"{int(med(runs, 'prefilled')):10d}"
        )
    ttft_ratio = med(grouped, "ttft") / med(alone, "ttft")
    tps_ratio = med(grouped, "tok_s") / med(separate, "tok_s")
    sep_ttft = med(separate, "ttft") / med(alone, "ttft")
    print(f"TTFT n=4 / n=1 alone: {ttft_ratio:.2f} (target <= 1.2; 4 x n=1: {sep_ttft:.2f})")
    print(f"tok/s n=4 / 4 x n=1:  {tps_ratio:.2f} (target >= 1.0)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/tokenyard/models")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 32 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 3, 32
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
