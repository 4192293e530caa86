"""Helpers shared by the inference engine tests."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from services.inference.engine import Engine, EngineRequest, Sampling, TokenEvent
from services.inference.engine.kv_cache import DecodeBatch
from services.inference.engine.runner import Runner
from services.inference.engine.threads import claim_torch_threads, release_default_threads
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


def threads_after(call: Callable[[], object]) -> int:
    """torch's thread count on a worker's compute thread after `call` ran there.

    A worker's layout (threads.py): one thread by default, the engine's compute thread
    claims two. Kernels that split work themselves once reset the caller to the
    default on first use, and the engine's 1-row steps ran on one core.
    """
    seen: list[int] = []
    claimed, released = threading.Event(), threading.Event()

    def compute() -> None:
        claim_torch_threads(2)
        claimed.set()
        released.wait(timeout=60)
        call()
        seen.append(torch.get_num_threads())

    default = torch.get_num_threads()
    thread = threading.Thread(target=compute)
    try:
        thread.start()
        assert claimed.wait(timeout=60)
        release_default_threads()  # as Engine.start does once the compute thread claimed
        released.set()
        thread.join(timeout=60)
    finally:
        released.set()
        torch.set_num_threads(default)
    assert len(seen) == 1, "the call did not finish on the compute thread"
    return seen[0]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def pack_int4(codes: torch.Tensor, block: int) -> torch.Tensor:
    """Codes ``[out, in]`` in PyTorch's CPU int4 layout with blocks of `block` channels,
    written independently of quant.py: ``[out / B][in][B / 2]`` bytes, channel j in the
    low nibble and j + B / 2 in the high one."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).view(n // block, block, k).transpose(1, 2)
    half = block // 2
    return (blocks[..., :half] | (blocks[..., half:] << 4)).contiguous().view(n, k // 2)


def spy(kernel: Callable[..., torch.Tensor], calls: list[Any], note: Callable[..., Any]) -> Any:
    """`kernel`, noting ``note(*args)`` in `calls` on every call."""

    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(note(*args))
        return kernel(*args, **kwargs)

    return call


def ragged_decode_step(runner: Runner, rows: int = 5, length: int = 30) -> torch.Tensor:
    """The decode logits of `rows` rows whose prompts are `length`, `length - 1`, ...
    tokens long (fixed random ids), each prefilled first."""
    ids = torch.randint(
        0, runner.vocab_size, (rows, length), generator=torch.Generator().manual_seed(9)
    )
    return prefill_then_decode(runner, ids, [length - slot for slot in range(rows)])[1]


def attention_case(
    rows: int, kv_heads: int, group: int, head_dim: int, capacity: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q, k, v, lengths`` for a decode-attention kernel (seeded by `rows`):
    q rows strided as a slice of a fused QKV output, row 0 over every position and the
    last row (if another) over one."""
    torch.manual_seed(rows)
    slots = rows + 2
    k = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    v = torch.randn(slots, kv_heads, capacity, head_dim).to(dtype)
    lengths = torch.randint(1, capacity + 1, (rows,))
    lengths[0] = capacity
    if rows > 1:
        lengths[-1] = 1
    qkv = torch.randn(rows, kv_heads * group + 2 * kv_heads, head_dim).to(dtype)
    q = qkv[:, : kv_heads * group].reshape(rows, kv_heads, group, head_dim)
    return q, k, v, lengths


def sdpa_over_lengths(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """What a decode-attention kernel computes, by float32 SDPA: ``[rows, heads * dim]``."""
    rows, width = q.shape[0], int(lengths.max())
    mask = (torch.arange(width)[None] < lengths[:, None])[:, None, None]
    out = F.scaled_dot_product_attention(
        q.float(), k[:rows, :, :width].float(), v[:rows, :, :width].float(), mask, scale=scale
    )
    return out.reshape(rows, -1)
