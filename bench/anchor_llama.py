"""llama.cpp as an anchor for bench/engine_bench.py, run with the llama venv's interpreter.

Reads a JSON workload on stdin (bench/anchors.py writes it: the GGUF, the prompts as
token ids per concurrency, new tokens, threads) and prints one line
``anchor-result: {...}`` with a row per measurement: tokens, seconds, TTFT and
per-stream rates, in the engine bench's `Result` fields. Standard library and
llama-cpp-python only. Greedy decoding, EOS ignored: every stream makes exactly
`new_tokens` tokens, and the count is checked.

- ``completion``: one stream through ``Llama.create_completion`` (the binding's
  public API), EOS masked by ``logit_bias``; TTFT from a ``max_tokens=1`` call.
- ``batched``: every stream of a level decoded together through the low-level
  ``llama_batch`` API (one sequence id per stream, greedy sampler), as
  llama.cpp's own ``batched`` example does; the binding has no batched generate.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import llama_cpp

RESULT = "anchor-result: "
N_BATCH = 512  # prompt tokens per llama_decode call, as the engine's max_batch_tokens


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def model_params() -> Any:
    """Default model parameters without ggml's extra buffer types (weight repacking).

    On an AMX CPU the extra buffers put Q4_1 weights in ggml's AMX layout, and the
    first decode segfaults in ggml_backend_amx_mul_mat (llama.cpp issue #20824,
    machine-dependent); without them the weights stay in the AVX-512 kernels' layout.
    llama.cpp's own CLI offers the same switch as --no-repack.
    """
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    return params


def context_size(prompts: list[list[int]], new: int) -> int:
    """Context per stream: the longest prompt plus the new tokens, in blocks of 256."""
    need = max(map(len, prompts)) + new + 1
    return -(-need // 256) * 256


def completion_row(gguf: str, prompt: list[int], new: int, threads: int) -> dict[str, Any]:
    """One stream through the binding's `create_completion`, EOS masked."""
    # `Llama` takes no model parameters of ours: hand it the same ones for its load.
    with mock.patch.object(llama_cpp.llama_cpp, "llama_model_default_params", model_params):
        llm = llama_cpp.Llama(
            model_path=gguf,
            n_ctx=context_size([prompt], new),
            n_batch=N_BATCH,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    end_of_generation = [
        t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
    ]  # every token that would end a completion, not only EOS
    options: dict[str, Any] = {
        "temperature": 0.0,
        "logit_bias": dict.fromkeys(end_of_generation, float("-inf")),
    }
    llm.create_completion(prompt, max_tokens=8, **options)  # warm-up
    llm.reset()  # a reset drops the binding's prompt cache: every call prefills
    t0 = time.perf_counter()
    llm.create_completion(prompt, max_tokens=1, **options)
    ttft = time.perf_counter() - t0
    llm.reset()
    t0 = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=new, **options)
    seconds = time.perf_counter() - t0
    tokens = int(out["usage"]["completion_tokens"])
    assert tokens == new, f"create_completion made {tokens} tokens, not {new}"
    llm.close()
    return {
        "name": f"llama.cpp {llama_cpp.__version__} completion",
        "concurrency": 1,
        "tokens": tokens,
        "seconds": seconds,
        "ttft": [ttft],
        "per_stream": [(tokens - 1) / (seconds - ttft)] if seconds > ttft else [],
        "rss_mib": peak_rss_mib(),
    }


class Batched:
    """The loaded GGUF, and a context sized for each level's streams."""

    def __init__(self, gguf: str, threads: int) -> None:
        llama_cpp.llama_backend_init()
        self.threads = threads
        self.model = llama_cpp.llama_model_load_from_file(gguf.encode(), model_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.sampler = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        llama_cpp.llama_model_free(self.model)

    def run(self, prompts: list[list[int]], new: int) -> dict[str, Any]:
        """Decode every prompt as its own sequence, all of them in each step."""
        n = len(prompts)
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = n
        params.n_ctx = n * context_size(prompts, new)
        params.n_batch = max(N_BATCH, n)
        params.n_ubatch = max(N_BATCH, n)
        params.n_threads = params.n_threads_batch = self.threads
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {n} sequences")
        batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        try:
            return self._decode(ctx, batch, prompts, new)
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)

    def _decode(self, ctx: Any, batch: Any, prompts: list[list[int]], new: int) -> dict[str, Any]:
        n = len(prompts)
        produced: list[list[int]] = [[] for _ in prompts]
        first = [0.0] * n
        last = [0.0] * n

        def submit(entries: list[tuple[int, int, int, bool]]) -> None:
            """Decode (token, position, sequence, wants logits) entries; sample the marked."""
            batch.n_tokens = len(entries)
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = int(logits)
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            now = time.perf_counter()
            for i, (_, _, seq, logits) in enumerate(entries):
                if logits:
                    produced[seq].append(llama_cpp.llama_sampler_sample(self.sampler, ctx, i))
                    first[seq] = first[seq] or now
                    last[seq] = now

        t0 = time.perf_counter()
        prefill = [
            (token, pos, seq, pos == len(prompt) - 1)
            for seq, prompt in enumerate(prompts)
            for pos, token in enumerate(prompt)
        ]
        for start in range(0, len(prefill), N_BATCH):
            submit(prefill[start : start + N_BATCH])
        for step in range(1, new):  # EOS ignored: every sequence runs to `new` tokens
            submit([(produced[s][-1], len(p) + step - 1, s, True) for s, p in enumerate(prompts)])
        seconds = time.perf_counter() - t0
        tokens = sum(map(len, produced))
        assert tokens == n * new, f"batched decode made {tokens} tokens, not {n} x {new}"
        return {
            "name": f"llama.cpp {llama_cpp.__version__} batched",
            "concurrency": n,
            "tokens": tokens,
            "seconds": seconds,
            "ttft": [f - t0 for f in first],
            "per_stream": [(new - 1) / (b - a) for a, b in zip(first, last, strict=True) if b > a],
            "rss_mib": peak_rss_mib(),
        }


def main() -> None:
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the binding's log relay
    work = json.load(sys.stdin)
    gguf, new, threads = work["model"], int(work["new_tokens"]), int(work["threads"])
    levels: dict[int, list[list[int]]] = {int(k): v for k, v in work["prompts"].items()}
    rows = []
    if 1 in levels:
        rows.append(completion_row(gguf, levels[1][0], new, threads))
    batched = Batched(gguf, threads)
    try:
        batched.run(levels[min(levels)][:4], 8)  # warm-up
        rows += [batched.run(levels[n], new) for n in sorted(levels)]
    finally:
        batched.close()
    print(RESULT + json.dumps({"version": llama_cpp.__version__, "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
