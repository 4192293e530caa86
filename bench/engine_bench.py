"""Benchmark the inference engine against transformers' own generation on the demo model.

One run, same prompts, fixed output length (EOS ignored): (a) sequential
`model.generate` in float32 (the baseline), (b) static batched `generate` at batch 16
with left padding, (c) transformers' continuous batching (`generate_batch`), and
(d) the engine at several concurrencies, requests arriving together or staggered, in
a process of its own with the worker's thread layout (services/inference/engine/threads.py).
Prints aggregate and per-stream tok/s, TTFT p50/p99, peak RSS and ratios to (a) and
(b), and writes a PNG plot to bench/out/.

    .venv/bin/python bench/engine_bench.py            # full run (~5 min on 2 cores)
    .venv/bin/python bench/engine_bench.py --quick    # shorter outputs, fewer levels
    .venv/bin/python bench/engine_bench.py --quantize none,int8,int4   # quantisation rows

--quantize runs only the engine, once per mode and level (1 and 16 streams by
default, --levels to change), alternated --ab-reps times so every mode sees the same
machine load; it prints each mode's best and median tok/s, its ratio to the first
mode (none: bf16, packed) and the weights the engine holds.

--anchors llama,vllm adds llama.cpp and vLLM rows to any run, measured after the
engine's on the same prompts and new tokens (EOS ignored), and the engine's tok/s
over theirs per concurrency; each runs in its own virtual environment (bench/anchors.py,
--llama-python / --vllm-python or TOKENYARD_BENCH_LLAMA_PYTHON / _VLLM_PYTHON).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import anchors
from services.inference.engine import Engine, EngineRequest, Sampling
from services.inference.engine.threads import confine_torch_threads
from services.inference.model_loading import LoadedModel, load_model

OUT = Path(__file__).resolve().parent / "out"
QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, in simple words for a child.",
    "Describe a walk through a busy market in a city you would like to visit.",
    "What are three good habits for writing clear and maintainable software code?",
]


@dataclass
class Result:
    """One measured configuration."""

    name: str
    concurrency: int
    tokens: int
    seconds: float
    ttft: list[float]
    per_stream: list[float]
    rss_mib: float
    weight_mib: float = 0.0  # weights the engine's runner holds

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    def pct(self, q: float) -> float:
        values = sorted(self.ttft)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def peak_rss_mib() -> float:
    # VmHWM: getrusage's maxrss survives exec, so a child would report its parent's peak.
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompts_for(loaded: LoadedModel, n: int) -> list[list[int]]:
    tok = loaded.tokenizer
    out = []
    for i in range(n):
        text = tok.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    return out


def bench_sequential(loaded: LoadedModel, prompts: list[list[int]], new: int) -> Result:
    model = loaded.model
    ttft, per_stream, total = [], [], 0
    started = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
            ttft.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False
            )
            per_stream.append((out.shape[1] - len(prompt)) / (time.perf_counter() - t0))
        total += out.shape[1] - len(prompt)
    seconds = time.perf_counter() - started - sum(ttft)
    return Result("sequential generate", 1, total, seconds, ttft, per_stream, peak_rss_mib())


def bench_static_batch(
    loaded: LoadedModel, prompts: list[list[int]], new: int, label: str
) -> Result:
    tok, model = loaded.tokenizer, loaded.model
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        seconds = time.perf_counter() - t0
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    return Result(
        f"static batch {label}",
        len(prompts),
        tokens,
        seconds,
        [ttft] * len(prompts),
        [tokens / len(prompts) / seconds] * len(prompts),
        peak_rss_mib(),
    )


def bench_generate_batch(loaded: LoadedModel, prompts: list[list[int]], new: int) -> Result | str:
    from transformers import GenerationConfig

    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        eos_token_id=loaded.tokenizer.eos_token_id,
        pad_token_id=loaded.tokenizer.eos_token_id,
    )
    try:
        t0 = time.perf_counter()
        outputs = loaded.model.generate_batch(prompts, generation_config=config)
        seconds = time.perf_counter() - t0
    except Exception as exc:  # a failing third-party path is a result too
        return f"generate_batch failed: {type(exc).__name__}: {exc}"[:300]
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return Result(
        "transformers generate_batch",
        len(prompts),
        tokens,
        seconds,
        [],
        [tokens / len(prompts) / seconds] * len(prompts),
        peak_rss_mib(),
    )


async def bench_engine(
    engine: Engine, prompts: list[list[int]], new: int, stagger: float, name: str
) -> Result:
    sampling = Sampling(max_tokens=new, temperature=0.0, ignore_eos=True)
    ttft: list[float] = []
    per_stream: list[float] = []

    async def one(i: int, prompt: list[int]) -> int:
        await asyncio.sleep(i * stagger)
        t0 = time.perf_counter()
        first = last = 0.0
        n = 0
        async for batch in engine.generate(EngineRequest(f"{name}-{i}", prompt, sampling)):
            last = time.perf_counter()
            if n == 0:
                first = last
                ttft.append(first - t0)
            n += len(batch)
        if n > 1 and last > first:
            per_stream.append((n - 1) / (last - first))
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    seconds = time.perf_counter() - t0
    return Result(name, len(prompts), sum(counts), seconds, ttft, per_stream, peak_rss_mib())


def run_engine_levels(
    loaded: LoadedModel,
    levels: list[int],
    new: int,
    stagger: float,
    label: str,
    *,
    together_only: bool = False,
    compute_threads: int | None = None,
    quantize: str = "none",
) -> list[Result]:
    async def main() -> list[Result]:
        engine = Engine(
            loaded,
            max_running=max(levels),
            max_queued=64,
            max_batch_tokens=512,
            compute_threads=compute_threads,
            take_model_weights=True,  # as a worker: the engine's copies only
            quantize=quantize,
        )
        weight_mib = engine.runner.weight_bytes() / 2**20
        engine.warmup()
        engine.start()
        results = []
        try:
            # One throwaway run so every batch shape has been seen once.
            await bench_engine(engine, prompts_for(loaded, 4), 8, 0.0, "warm")
            for n in levels:
                for mode, gap in (("together", 0.0), ("staggered", stagger)):
                    if mode == "staggered" and (n == 1 or together_only):
                        continue
                    r = await bench_engine(
                        engine, prompts_for(loaded, n), new, gap, f"engine {label} {mode}"
                    )
                    r.weight_mib = weight_mib
                    print_row(r, None, None)
                    results.append(r)
            stats = engine.stats()
            print(
                f"  prefix cache: {stats.prefix_cache_hits}/{stats.prefix_cache_queries} hits, "
                f"{stats.prefix_cache_reused_tokens} tokens reused; "
                f"kv cache {stats.kv_cache_bytes / 2**20:.0f} MiB"
            )
        finally:
            await engine.stop()
        return results

    return asyncio.run(main())


def engine_child(args: argparse.Namespace) -> None:
    """The engine's side of the benchmark, in a process laid out as a worker's.

    A worker confines torch to its compute thread before loading (threads.py); the
    baselines above ran multi-threaded on this process's main thread, which would
    leave a second OpenMP pool and slow the engine's kernels, so the engine runs in
    a fresh process of its own, as in production.
    """
    compute_threads = confine_torch_threads()
    loaded = load_model(args.model, device="cpu", dtype=args.dtype, cache_dir=args.cache_dir)
    label = str(loaded.dtype).removeprefix("torch.")
    if args.quantize not in (None, "none"):
        label += f" {args.quantize}"
    levels = [int(x) for x in args.levels.split(",")]
    results = run_engine_levels(
        loaded,
        levels,
        args.new_tokens,
        args.stagger,
        label,
        together_only=args.together_only,
        compute_threads=compute_threads,
        quantize=args.quantize or "none",
    )
    print(CHILD_RESULT + json.dumps([dataclasses.asdict(r) for r in results]), flush=True)


CHILD_RESULT = "engine-child-result: "


def run_engine_process(
    args: argparse.Namespace,
    levels: list[int],
    dtype: str,
    *,
    together_only: bool = False,
    quantize: str = "none",
) -> list[Result]:
    """Run `engine_child` in a new process; relays its rows and returns its results."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--engine-child",
        f"--model={args.model}",
        f"--cache-dir={args.cache_dir}",
        f"--new-tokens={args.new_tokens}",
        f"--levels={','.join(map(str, levels))}",
        f"--dtype={dtype}",
        f"--stagger={args.stagger}",
        f"--quantize={quantize}",
        *(["--together-only"] if together_only else []),
    ]
    results: list[Result] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(CHILD_RESULT):
                results = [Result(**r) for r in json.loads(line.removeprefix(CHILD_RESULT))]
            elif not together_only:
                print(line, end="", flush=True)
    if child.returncode != 0:
        raise SystemExit(f"engine benchmark process failed (exit {child.returncode})")
    return results


def interleaved(
    args: argparse.Namespace, fp32: LoadedModel, new: int
) -> list[tuple[str, float, float]]:
    """Best-of-`--ab-reps` A/B runs, alternated so both sides see the same machine load.

    The 2-core machine is shared, so a run minutes apart can see twice the load; taking
    each side's best of several alternated runs compares like with like.
    """
    one, sixteen = prompts_for(fp32, 1), prompts_for(fp32, 16)
    best: dict[str, float] = {}
    for _ in range(args.ab_reps):
        seq = bench_sequential(fp32, one, new)
        best["a"] = max(best.get("a", 0.0), seq.tok_s)
        e1, e16 = run_engine_process(args, [1, 16], args.dtype, together_only=True)
        best["e1"] = max(best.get("e1", 0.0), e1.tok_s)
        best["e16"] = max(best.get("e16", 0.0), e16.tok_s)
        st = bench_static_batch(fp32, sixteen, new, "16 fp32")
        best["b"] = max(best.get("b", 0.0), st.tok_s)
    return [
        ("engine c=1 vs (a) sequential generate fp32", best["e1"], best["a"]),
        ("engine c=16 vs (a) sequential generate fp32", best["e16"], best["a"]),
        ("engine c=16 vs (b) static batch 16 fp32", best["e16"], best["b"]),
    ]


def quantize_rows(
    args: argparse.Namespace, modes: list[str], levels: list[int]
) -> dict[str, dict[int, float]]:
    """Each mode at each level, alternated `--ab-reps` times; ratios to the first mode.

    Returns each mode's best tok/s per level.
    """
    runs: dict[tuple[str, int], list[float]] = {}
    weights: dict[str, float] = {}
    rss: dict[str, float] = {}
    for rep in range(max(1, args.ab_reps)):
        for mode in modes:
            for r in run_engine_process(
                args, levels, args.dtype, together_only=True, quantize=mode
            ):
                runs.setdefault((mode, r.concurrency), []).append(r.tok_s)
                weights[mode] = r.weight_mib
                rss[mode] = max(rss.get(mode, 0.0), r.rss_mib)
        print(f"  repetition {rep + 1}/{max(1, args.ab_reps)} done", flush=True)
    first = modes[0]
    print(
        f"\n{'quantize':8s} {'conc':>4s} {'best tok/s':>10s} {'median':>8s} {'min':>8s} "
        f"{'best vs ' + first:>14s} {'weights MiB':>11s} {'vs ' + first:>8s} {'peak RSS':>8s}"
    )
    for n in levels:
        for mode in modes:
            values = runs[(mode, n)]
            ratio = max(values) / max(runs[(first, n)])
            print(
                f"{mode:8s} {n:4d} {max(values):10.1f} {statistics.median(values):8.1f} "
                f"{min(values):8.1f} {ratio:13.2f}x {weights[mode]:11.1f} "
                f"{weights[mode] / weights[first]:7.2f}x {rss[mode]:8.0f}",
                flush=True,
            )
    return {mode: {n: max(runs[(mode, n)]) for n in levels} for mode in modes}


def anchor_rows(
    args: argparse.Namespace,
    loaded: LoadedModel,
    engine: dict[str, dict[int, float]],
    base: Result | None = None,
    static: Result | None = None,
) -> list[Result]:
    """The `--anchors` rows on this run's prompts, then the engine's ratios to them."""
    if not args.anchors:
        return []
    print(f"\nanchors ({args.new_tokens} new tokens, {args.anchor_threads} threads)")
    results = [
        Result(**row)
        for row in anchors.measure(args, lambda n: prompts_for(loaded, n), args.new_tokens)
    ]
    if results:
        print(HEADER)
    for r in results:
        print_row(r, base, static)
    anchors.print_ratios(engine, [(r.name, r.concurrency, r.tok_s) for r in results])
    return results


def engine_tok_s(results: list[Result]) -> dict[str, dict[int, float]]:
    """tok/s of the engine's together rows, by label (its dtype) and concurrency."""
    by_label: dict[str, dict[int, float]] = {}
    for r in results:
        if r.name.endswith(" together"):
            label = r.name.removeprefix("engine ").removesuffix(" together")
            by_label.setdefault(label, {})[r.concurrency] = r.tok_s
    return by_label


def print_row(r: Result, base: Result | None, static: Result | None) -> None:
    ratio_a = f"{r.tok_s / base.tok_s:6.2f}x" if base else "      "
    ratio_b = f"{r.tok_s / static.tok_s:6.2f}x" if static else "      "
    stream = statistics.mean(r.per_stream) if r.per_stream else float("nan")
    print(
        f"{r.name:34s} {r.concurrency:4d} {r.tok_s:9.1f} {stream:9.1f} "
        f"{r.pct(0.5) * 1000:8.0f} {r.pct(0.99) * 1000:8.0f} {r.rss_mib:8.0f} {ratio_a} {ratio_b}",
        flush=True,
    )


HEADER = (
    f"{'configuration':34s} {'conc':>4s} {'tok/s':>9s} {'stream':>9s} "
    f"{'ttft p50':>8s} {'ttft p99':>8s} {'rss MiB':>8s} {'vs (a)':>7s} {'vs (b)':>7s}"
)


def plot(results: list[Result], base: Result, static: Result, label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, marker in (("together", "o"), ("staggered", "s")):
        rows = [r for r in results if r.name.endswith(mode) and label in r.name]
        rows = sorted(rows, key=lambda r: r.concurrency)
        if not rows:
            continue
        xs = [r.concurrency for r in rows]
        ax1.plot(xs, [r.tok_s for r in rows], marker=marker, label=f"engine {label}, {mode}")
        ax2.plot(xs, [r.pct(0.5) * 1000 for r in rows], marker=marker, label=f"p50, {mode}")
        ax2.plot(
            xs, [r.pct(0.99) * 1000 for r in rows], marker=marker, ls=":", label=f"p99, {mode}"
        )
    ax1.axhline(base.tok_s, color="gray", ls="--", label="(a) sequential generate fp32")
    ax1.axhline(static.tok_s, color="black", ls=":", label=f"(b) {static.name}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("aggregate tokens/s")
    ax1.legend(fontsize=8)
    ax1.set_title("throughput (SmolLM2-135M, 2-core CPU)")
    ax2.axhline(base.pct(0.5) * 1000, color="gray", ls="--", label="(a) TTFT")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("time to first token (ms)")
    ax2.legend(fontsize=8)
    ax2.set_title("time to first token")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/tokenyard/models")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--levels", default=None, help="concurrencies (default 1,4,16,32,64; 1,16 with --quantize)"
    )
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (as the worker's)")
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between arrivals")
    parser.add_argument("--sequential-prompts", type=int, default=4)
    parser.add_argument("--engine-fp32", action="store_true", help="also run the engine in fp32")
    parser.add_argument("--ab-reps", type=int, default=3, help="interleaved A/B repetitions")
    parser.add_argument("--quick", action="store_true", help="32 new tokens, levels 1,16,64")
    parser.add_argument(
        "--engine-only", action="store_true", help="skip (a) and (b): engine levels only"
    )
    parser.add_argument(
        "--quantize",
        default=None,
        help="comma-separated modes (none,int8,int4): engine rows per mode, nothing else",
    )
    anchors.add_arguments(parser)
    parser.add_argument("--engine-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--together-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_child:
        engine_child(args)
        return
    if args.quick:
        args.new_tokens, args.levels, args.sequential_prompts = 32, "1,16,64", 2
    if args.levels is None:
        args.levels = "1,16" if args.quantize else "1,4,16,32,64"
    if args.quantize:
        print(f"{args.new_tokens} new tokens, dtype {args.dtype}; modes {args.quantize}")
        levels = [int(x) for x in args.levels.split(",")]
        best = quantize_rows(args, args.quantize.split(","), levels)
        if args.anchors:  # the parent loads the model only for the prompts' tokens
            loaded = load_model(args.model, device="cpu", cache_dir=args.cache_dir)
            anchor_rows(args, loaded, best)
        return
    levels = [int(x) for x in args.levels.split(",")]
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    new = args.new_tokens

    engine_model = load_model(args.model, device="cpu", dtype=args.dtype, cache_dir=args.cache_dir)
    label = str(engine_model.dtype).removeprefix("torch.")
    prompt_len = len(prompts_for(engine_model, 1)[0])
    print(f"model {engine_model.name}, {new} new tokens, prompt {prompt_len} tokens")
    print(f"torch threads {torch.get_num_threads()}, engine dtype {label} (--dtype {args.dtype})")
    if args.engine_only:
        print(HEADER)
        results = run_engine_process(args, levels, args.dtype)
        anchor_rows(args, engine_model, engine_tok_s(results))
        return
    bf16 = (
        engine_model
        if engine_model.dtype is torch.bfloat16
        else load_model(args.model, device="cpu", dtype="bfloat16", cache_dir=args.cache_dir)
    )
    fp32 = load_model(args.model, device="cpu", dtype="float32", cache_dir=args.cache_dir)
    print(HEADER)
    base = bench_sequential(fp32, prompts_for(fp32, args.sequential_prompts), new)
    print_row(base, base, None)
    static32 = bench_static_batch(fp32, prompts_for(fp32, 16), new, "16 fp32")
    print_row(static32, base, static32)
    static16 = bench_static_batch(bf16, prompts_for(bf16, 16), new, "16 bf16")
    print_row(static16, base, static32)
    cb = bench_generate_batch(bf16, prompts_for(bf16, 16), new)
    if isinstance(cb, Result):
        cb.name += " bf16"
        print_row(cb, base, static32)
    else:
        print(f"{'transformers generate_batch':34s} {cb}")
    results = run_engine_process(args, levels, args.dtype)
    if args.engine_fp32 and label != "float32":
        results += run_engine_process(args, [1, 16], "float32")
    anchored = anchor_rows(args, engine_model, engine_tok_s(results), base, static32)
    print("\nsummary (ratios to (a) sequential fp32 and (b) static batch 16 fp32)")
    print(HEADER)
    baselines = [base, static32, static16, *([cb] if isinstance(cb, Result) else [])]
    for r in [*baselines, *results, *anchored]:
        print_row(r, base, static32)
    path = OUT / "engine_bench.png"
    plot(results, base, static32, label, path)
    print(f"plot: {path}")
    if args.ab_reps > 0:
        print(f"\ninterleaved A/B, best of {args.ab_reps} (tok/s)")
        for label, engine_tps, base_tps in interleaved(args, fp32, new):
            ratio = engine_tps / base_tps
            print(f"  {label:44s} {engine_tps:8.1f} vs {base_tps:8.1f} = {ratio:5.2f}x")


if __name__ == "__main__":
    main()
