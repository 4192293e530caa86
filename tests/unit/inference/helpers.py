"""Helpers shared by the inference engine tests."""

from __future__ import annotations

from typing import Any

import torch

from services.inference.engine import Engine, EngineRequest, Sampling, TokenEvent
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
