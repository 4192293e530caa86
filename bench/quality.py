"""What quantisation costs in quality: perplexity and agreement with bf16, per --quantize.

For each of none/int8/int4 the engine's fast path (`Runner`) runs the demo model on

* a fixed text, bench/data/coriolanus.txt (~4,700 tokens): the opening of
  Shakespeare's *Coriolanus* (public domain), the first 574 lines of
  data/tinyshakespeare/input.txt in github.com/karpathy/char-rnn. The text is cut
  into `--windows` equal segments run side by side as one decode batch, each token
  fed in turn (teacher forcing), so every position is scored by the same decode
  step that serves requests. Reported: perplexity, its ratio to none (bf16), and
  top-1 agreement with none at each position;
* greedy generation of `--new-tokens` tokens from a set of prompts (chat-templated),
  compared with none: the share of tokens equal before the first divergence, and
  the prompts whose whole output is identical.

    .venv/bin/python bench/quality.py                  # bf16, none/int8/int4 (~2 min)
    .venv/bin/python bench/quality.py --dtype float32  # the same in float32
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.inference.engine.runner import Runner
from services.inference.model_loading import LoadedModel, load_model

TEXT = Path(__file__).resolve().parent / "data" / "coriolanus.txt"
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, in simple words for a child.",
    "Describe a walk through a busy market in a city you would like to visit.",
    "What are three good habits for writing clear and maintainable software code?",
    "What is the capital of France, and what is it famous for?",
    "List five animals that live in the ocean and one fact about each.",
    "How do I reverse a list in Python? Show a short example.",
    "Summarise the water cycle in three sentences.",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is 17 multiplied by 23? Explain the steps.",
]


@dataclass
class Scores:
    """Teacher-forced scores on the text: per-position NLL and top-1 tokens."""

    nll: torch.Tensor
    top1: torch.Tensor

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.mean()))


def decode_step(runner: Runner, cache: object, tokens: torch.Tensor, position: int) -> torch.Tensor:
    b = tokens.shape[0]
    positions = torch.full((b,), position, dtype=torch.long)
    write = runner.write_rows(cache, positions)  # type: ignore[arg-type]
    mask = torch.ones((b, 1, 1, position + 1), dtype=torch.bool)  # every position so far
    return runner.decode(cache, tokens, positions, write, mask)  # type: ignore[arg-type]


@torch.inference_mode()
def score_text(runner: Runner, ids: list[int], windows: int) -> Scores:
    """Every window's next-token NLL and argmax, the windows decoded as one batch."""
    length = len(ids) // windows
    batch = torch.tensor(ids[: length * windows]).view(windows, length)
    cache = runner.new_cache(windows, length)
    nll, top1 = [], []
    for pos in range(length - 1):
        logits = decode_step(runner, cache, batch[:, pos], pos).float()
        target = batch[:, pos + 1]
        nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        top1.append(logits.argmax(-1))
    return Scores(torch.stack(nll, 1).flatten(), torch.stack(top1, 1).flatten())


@torch.inference_mode()
def greedy(runner: Runner, prompt: list[int], new: int) -> list[int]:
    cache = runner.new_cache(1, len(prompt) + new)
    logits = runner.prefill(cache, [(0, torch.tensor(prompt), 0)])
    out: list[int] = []
    for i in range(new):
        token = int(logits[-1].float().argmax())
        out.append(token)
        if i + 1 < new:
            logits = decode_step(runner, cache, torch.tensor([token]), len(prompt) + i)
    return out


def prompt_ids(loaded: LoadedModel) -> list[list[int]]:
    tok = loaded.tokenizer
    out = []
    for question in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        out.append(list(tok(text, add_special_tokens=False)["input_ids"]))
    return out


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/tokenyard/models")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", default="none,int8,int4")
    parser.add_argument("--windows", type=int, default=8, help="text segments decoded together")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=0, help="score only the first N")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_model(args.model, device="cpu", dtype=args.dtype, cache_dir=args.cache_dir)
    ids = list(loaded.tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"])
    ids = ids[: args.text_tokens] if args.text_tokens else ids
    prompts = prompt_ids(loaded)
    dtype = str(loaded.dtype).removeprefix("torch.")
    print(
        f"model {loaded.name} ({dtype}); text {TEXT.name}: {len(ids)} tokens in "
        f"{args.windows} windows; {len(prompts)} prompts x {args.new_tokens} greedy tokens"
    )
    print(
        f"{'quantize':8s} {'weights MiB':>11s} {'perplexity':>10s} {'vs none':>8s} "
        f"{'top-1 = none':>12s} {'greedy prefix = none':>20s} {'identical':>9s} {'s':>5s}"
    )
    base: Scores | None = None
    base_out: list[list[int]] = []
    for mode in args.modes.split(","):
        started = time.perf_counter()
        runner = Runner(loaded.model, quantize=mode, gguf=loaded.gguf)  # as a worker
        scores = score_text(runner, ids, args.windows)
        outs = [greedy(runner, p, args.new_tokens) for p in prompts]
        if base is None:
            base, base_out = scores, outs
        ratio = scores.perplexity / base.perplexity
        top1 = float((scores.top1 == base.top1).float().mean())
        matched = sum(prefix_match(a, b) for a, b in zip(outs, base_out, strict=True))
        share = matched / sum(len(b) for b in base_out)
        same = sum(a == b for a, b in zip(outs, base_out, strict=True))
        print(
            f"{mode:8s} {runner.weight_bytes() / 2**20:11.1f} {scores.perplexity:10.3f} "
            f"{ratio:8.4f} {top1:12.1%} {share:20.1%} {same:>5d}/{len(prompts):<3d} "
            f"{time.perf_counter() - started:5.0f}",
            flush=True,
        )
        del runner


if __name__ == "__main__":
    main()
