"""Batched next-token selection with per-row sampling settings.

Randomness is one counter-based uniform per (request seed, token position), turned
into a token by inverse-CDF over the filtered distribution. So a row's draw
depends only on its own logits, seed and position: the same request gives the same
tokens alone or batched, and a resumed stream reproduces the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.common.requests import Sampling
from services.inference.engine import cpu_kernels

_MASK64 = (1 << 64) - 1


def position_seed(seed: int, position: int) -> int:
    """A well-mixed 64-bit seed for (seed, position) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs for one row: settings, seed, position, and the tokens seen."""

    config: Sampling
    seed: int
    position: int  # index of the token being drawn among the generated ones
    history: Sequence[int]  # prompt + generated tokens, for the repetition penalty


@dataclass(frozen=True)
class Sampled:
    """The chosen token and, when asked for, its logprob and the top alternatives."""

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]


def _apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    # Same rule as transformers: divide positive scores, multiply negative ones.
    for i, row in enumerate(rows):
        penalty = row.config.repetition_penalty
        if penalty == 1.0 or not row.history:
            continue
        ids = torch.tensor(row.history, dtype=torch.long, device=logits.device)
        scores = logits[i].gather(0, ids)
        scores = torch.where(scores < 0, scores * penalty, scores / penalty)
        logits[i].scatter_(0, ids, scores)


def _filter(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filters (removed tokens get -inf)."""
    device = logits.device
    temps = torch.tensor([r.config.temperature for r in rows], device=device)
    logits = logits / temps[:, None]
    neg_inf = float("-inf")
    top_k = [r.config.top_k for r in rows]
    if any(0 < k < logits.shape[-1] for k in top_k):
        ks = torch.tensor(
            [k if 0 < k < logits.shape[-1] else logits.shape[-1] for k in top_k], device=device
        )
        kth = torch.topk(logits, int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < kth, neg_inf)
    top_p = [i for i, r in enumerate(rows) if r.config.top_p < 1.0]
    if top_p:
        idx = torch.tensor(top_p, device=device)
        sub = logits[idx]
        ordered, order = torch.sort(sub, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        ps = torch.tensor([rows[i].config.top_p for i in top_p], device=device)
        drop = before >= ps[:, None]  # as transformers; the first token stays (before == 0)
        sub = sub.scatter(1, order, ordered.masked_fill(drop, neg_inf))
        logits[idx] = sub
    min_p = [i for i, r in enumerate(rows) if r.config.min_p > 0.0]
    if min_p:
        idx = torch.tensor(min_p, device=device)
        sub = logits[idx]
        probs = torch.softmax(sub, dim=-1)
        floor = (
            probs.max(dim=-1, keepdim=True).values
            * torch.tensor([rows[i].config.min_p for i in min_p], device=device)[:, None]
        )
        logits[idx] = sub.masked_fill(probs < floor, neg_inf)
    return logits


def uniform(seed: int, position: int) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, position)."""
    return (position_seed(seed, position) >> 11) * (1.0 / (1 << 53))


def _draw(filtered: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Inverse-CDF sampling from softmax(filtered), one counter-based uniform per row."""
    cdf = torch.cumsum(torch.softmax(filtered, dim=-1), dim=-1)
    u = torch.tensor([[uniform(r.seed, r.position)] for r in rows], device=filtered.device)
    chosen = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return chosen.clamp_(max=filtered.shape[-1] - 1).flatten()


def first_max(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first highest-scoring token (its first NaN if it has one).

    On CPU one call of tokenyard_ops.first_max (csrc/cpu_ops.cpp); else ``max(dim)``
    rather than ``argmax``: same index, but on CPU argmax over bf16 rows took 5x as
    long (64 x 49152 logits: 5.0 vs 1.0 ms, a twentieth of a 64-row decode step).
    """
    if (
        logits.device.type == "cpu"
        and logits.dim() == 2
        and logits.shape[1] > 0
        and logits.dtype in (torch.float32, torch.bfloat16)
        and cpu_kernels.OPS.available()
    ):
        chosen: torch.Tensor = torch.ops.tokenyard_ops.first_max(logits.contiguous())
        return chosen
    return logits.max(dim=-1).indices


def sample(
    logits: torch.Tensor, rows: Sequence[SampleRow], allowed: torch.Tensor | None = None
) -> list[Sampled]:
    """Choose one token per row of `logits` (``[rows, vocab]``, any float dtype).

    Greedy rows take the highest score in the given dtype (widening is exact, so it is the
    float32 choice); everything else is computed in float32. `allowed` (``[rows,
    vocab]`` bool, structured output) removes the tokens a row's format forbids
    before any filter; logprobs stay those of the model's raw distribution.
    """
    want_logprobs = [r.config.logprobs is not None for r in rows]
    simple = all(r.config.temperature == 0.0 and r.config.repetition_penalty == 1.0 for r in rows)
    if not simple:  # a float32 copy the filters below may change in place
        logits = logits.to(torch.float32, copy=True)
    elif any(want_logprobs):
        logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    if allowed is not None:  # rows allowing every token are left exactly as they were
        logits = logits.masked_fill(~allowed, float("-inf"))
    if simple:
        chosen = first_max(logits)
    else:
        _apply_repetition_penalty(logits, rows)
        greedy = torch.tensor([r.config.temperature == 0.0 for r in rows], device=logits.device)
        chosen = first_max(logits)
        if not bool(greedy.all()):
            sampled_idx = (~greedy).nonzero().flatten()
            sampled_rows = [rows[i] for i in sampled_idx.tolist()]
            filtered = _filter(logits[sampled_idx], sampled_rows)
            chosen[sampled_idx] = _draw(filtered, sampled_rows)
    chosen_list: list[int] = chosen.tolist()
    out: list[Sampled] = []
    for i, row in enumerate(rows):
        n = row.config.logprobs
        if raw_logprobs is None or n is None:
            out.append(Sampled(chosen_list[i], None, ()))
            continue
        lp = float(raw_logprobs[i, chosen_list[i]])
        top: tuple[tuple[int, float], ...] = ()
        if n > 0:
            values, ids = torch.topk(raw_logprobs[i], n)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(Sampled(chosen_list[i], lp, top))
    return out
