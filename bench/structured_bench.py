"""Benchmark structured output: 16 constrained streams against 16 free ones, same run.

The engine serves the demo model (or --model) with the worker's thread layout. Each
round runs, on the same 16 chat prompts: (a) 16 free-text streams (ignore_eos) and
(b) 16 streams each constrained by a different JSON Schema: an array of at least
100 items of one of the test schemas (tests/doubles/schemas.py), so no stream can
finish before max_tokens and both sides generate the same number of tokens. Sides
alternate in order each round (a load spike from elsewhere hits both alike); the
table shows medians and the ratio tok/s(constrained) / tok/s(free) (target >= 0.8),
and the time to build one step's token mask for the 16 rows. Then the compile time
of every test schema, cold (cache cleared) and cached, over --compiles repetitions:
p50 and p99.

    .venv/bin/python bench/structured_bench.py            # 5 rounds, 64 new tokens
    .venv/bin/python bench/structured_bench.py --quick    # 3 rounds, 32 new tokens
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.grammars import ResponseFormat
from services.inference.engine import Engine, EngineRequest, Sampling
from services.inference.engine.threads import confine_torch_threads
from services.inference.model_loading import load_model
from tests.doubles.schemas import SCHEMAS

STREAMS = 16


@dataclasses.dataclass
class Run:
    """One side of a round: tokens generated and wall time."""

    tokens: int
    seconds: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


async def measure(engine: Engine, requests: list[EngineRequest]) -> Run:
    """Submit `requests` together; count tokens until the last stream ends."""
    started = time.perf_counter()
    tokens = 0

    async def one(req: EngineRequest) -> None:
        nonlocal tokens
        async for batch in engine.generate(req):
            tokens += sum(1 for e in batch if e.token_id >= 0)

    await asyncio.gather(*(one(r) for r in requests))
    return Run(tokens, time.perf_counter() - started)


def long_list(item: dict[str, Any]) -> dict[str, Any]:
    """An array of at least 100 `item`s (its `$defs` moved up, so `$ref`s resolve)."""
    item = dict(item)
    defs = item.pop("$defs", None)
    wrapper: dict[str, Any] = {"type": "array", "minItems": 100, "items": item}
    if defs is not None:
        wrapper["$defs"] = defs
    return wrapper


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(args: argparse.Namespace) -> None:
    threads = confine_torch_threads()
    loaded = load_model(args.model, device="cpu", dtype=args.dtype, cache_dir=args.cache_dir)
    tok = loaded.tokenizer
    engine = Engine(
        loaded,
        max_running=STREAMS,
        max_queued=STREAMS,
        max_batch_tokens=4096,
        compute_threads=threads,
    )
    engine.start(warm=True)
    names = list(SCHEMAS)[:STREAMS]
    prompts = []
    for name in names:
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"A long JSON list of {name.replace('_', ' ')} items."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompts.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    long_lists = [ResponseFormat.of_json_schema(long_list(SCHEMAS[n])) for n in names]
    grammars = [await engine.grammars.compile_async(f.grammar()) for f in long_lists]
    sampling = Sampling(max_tokens=args.new_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)

    def side(seed: int, constrained: bool) -> list[EngineRequest]:
        return [
            EngineRequest(
                f"{'c' if constrained else 'f'}{i}",
                prompt,
                dataclasses.replace(sampling, seed=seed + i),
                grammar=grammars[i] if constrained else None,
            )
            for i, prompt in enumerate(prompts)
        ]

    # Time the per-step mask of the batch (all 16 rows constrained), as the scheduler calls it.
    mask_times: list[float] = []
    allowed = engine.grammars.allowed

    def timed_allowed(*a: Any, **kw: Any) -> Any:
        started = time.perf_counter()
        out = allowed(*a, **kw)
        if out is not None:
            mask_times.append(time.perf_counter() - started)
        return out

    engine.grammars.allowed = timed_allowed  # type: ignore[method-assign]
    free: list[Run] = []
    constrained: list[Run] = []
    cold: list[float] = []
    cached: list[float] = []
    try:
        await measure(engine, side(0, False))  # warm both sides' shapes
        await measure(engine, side(0, True))
        for round_ in range(args.rounds):
            sides = [(free, False), (constrained, True)]
            for runs, kind in sides if round_ % 2 == 0 else reversed(sides):
                runs.append(await measure(engine, side(1000 * (round_ + 1), kind)))
        sources = [ResponseFormat.of_json_schema(s).grammar() for s in SCHEMAS.values()]
        for _ in range(args.compiles):
            engine.grammars.forget()
            for source in sources:
                started = time.perf_counter()
                engine.grammars.compile(source)
                cold.append(time.perf_counter() - started)
            for source in sources:
                started = time.perf_counter()
                engine.grammars.compile(source)
                cached.append(time.perf_counter() - started)
    finally:
        await engine.stop()

    def med(runs: list[Run], key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in runs))

    print(f"model {loaded.name} ({loaded.dtype}), {STREAMS} streams x {args.new_tokens} "
          f"new tokens, {args.rounds} rounds (medians), torch threads {threads}")  # fmt: skip
    print(f"{'':28} {'tokens':>7} {'seconds':>8} {'tok/s':>8}")
    for name, runs in (
        ("16 free (unconstrained)", free),
        ("16 JSON Schema constrained", constrained),
    ):
        print(f"{name:28} {int(med(runs, 'tokens')):7d} {med(runs, 'seconds'):8.2f} "
              f"{med(runs, 'tok_s'):8.1f}")  # fmt: skip
    ratio = med(constrained, "tok_s") / med(free, "tok_s")
    print(f"tok/s constrained / free: {ratio:.2f} (target >= 0.8)")
    print(f"mask of one step ({STREAMS} rows, {len(mask_times)} steps): "
          f"p50 {1000 * percentile(mask_times, 0.5):.2f} ms, "
          f"p99 {1000 * percentile(mask_times, 0.99):.2f} ms")  # fmt: skip
    print(f"schema compile over {len(SCHEMAS)} test schemas x {args.compiles}:")
    for name, times in (("cold", cold), ("cached", cached)):
        print(f"  {name:7} p50 {1000 * percentile(times, 0.5):7.2f} ms   "
              f"p99 {1000 * percentile(times, 0.99):7.2f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/tokenyard/models")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compiles", type=int, default=10, help="cold compiles per schema")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 32 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.new_tokens = 3, 32
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
