"""Helpers shared by the inference engine tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from services.inference.engine import Engine, EngineRequest, Sampling, TokenEvent
from services.inference.engine.kv_cache import DecodeBatch
from services.inference.engine.runner import Runner
from services.inference.model_loading import LoadedModel


def hf_greedy(loaded: LoadedModel, prompt: list[int], max_new_tokens: int, **kw: Any) -> list[int]:
    """transformers' own greedy generation for one prompt (the reference)."""
    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **kw,
        )
    tokens: list[int] = out[0, len(prompt) :].tolist()
    return tokens


async def collect(engine: Engine, req: EngineRequest) -> list[TokenEvent]:
    """All events of one request, flattened."""
    events: list[TokenEvent] = []
    async for batch in engine.generate(req):
        events.extend(batch)
    return events


def request(
    prompt: list[int],
    request_id: str = "r",
    *,
    continuation: list[int] | None = None,
    **sampling: Any,
) -> EngineRequest:
    """An EngineRequest with sampling fields given as keywords (max_tokens defaults to 12)."""
    sampling.setdefault("max_tokens", 12)
    return EngineRequest(
        request_id, prompt, Sampling(**sampling), continuation_ids=continuation or []
    )


def prefill_then_decode(
    runner: Runner, ids: torch.Tensor, lengths: Sequence[int] | None = None, capacity: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r of `ids` (its first ``lengths[r]`` tokens, default all) prefilled but for
    its last token into slot r, then that token of every row decoded in one batch.

    Returns the prompts' logits and the decode step's, each ``[rows, vocab]``.
    """
    rows, width = ids.shape
    sizes = list(lengths) if lengths is not None else [width] * rows
    cache = runner.new_cache(rows, capacity)
    prompts = [runner.prefill(cache, [(r, ids[r, : n - 1], 0)]) for r, n in enumerate(sizes)]
    pos = torch.tensor([n - 1 for n in sizes])
    batch = DecodeBatch(
        tokens=ids[torch.arange(rows), pos],
        positions=pos,
        write_index=runner.write_rows(cache, pos),
        mask=(torch.arange(max(sizes))[None] <= pos[:, None])[:, None, None],
        rows=torch.arange(rows),
    )
    return torch.cat(prompts), runner.forward(cache, batch, [])
