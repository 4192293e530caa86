"""The engine's public data types: requests, token events, stats (sampling is shared)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.common.requests import Sampling

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
# token_id of an event that carries no token: the "cancelled" end of a stream.
NO_TOKEN = -1


class EngineFull(Exception):
    """Every running slot and queue place is taken; retry later or on another worker."""


class EngineClosed(Exception):
    """The engine is stopped (or stopping) and accepts no new requests."""


class EngineError(Exception):
    """The model computation failed; the request cannot complete."""


class InvalidRequest(ValueError):
    """A request breaks the engine's preconditions; `field` names it.

    The worker checks every request first (`services.common.requests`), so this is
    a bug in the caller, answered as an internal error, never a user's mistake.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class EngineRequest:
    """One generation: prompt tokens, sampling, and optional resume state and deadline.

    `continuation_ids` are tokens an earlier attempt already produced (router
    failover): they count as generated, and a seeded stream continues after them.
    `deadline` is a `time.monotonic()` instant after which the request is cancelled.
    `grammar` (a `grammar.CompiledGrammar`) constrains every sample's tokens to its
    format; the generation then ends "stop" once the format is complete.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: Sampling  # max_tokens resolved
    continuation_ids: list[int] = field(default_factory=list)
    deadline: float | None = None
    n: int = 1  # samples sharing the prompt's prefill; sample i is seeded with seed + i
    grammar: Any = None  # CompiledGrammar | None (engine.grammar imports torch)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or, with token_id NO_TOKEN, the end of a cancelled stream).

    `logprob` is the chosen token's log-probability under the model's raw distribution
    (before temperature and filters); `top_logprobs` the most likely alternatives,
    most likely first. `finish` is set on the last event of a stream. The first event
    carries `cached_prompt_tokens` (prompt tokens the prefix cache supplied) and
    `admitted_at`, the `time.monotonic()` instant the request got a slot: queueing
    ended and prefill began there. `index` says which of the request's n samples.
    """

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]
    finish: str | None
    cached_prompt_tokens: int = 0
    admitted_at: float | None = None
    index: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of the engine's load and counters."""

    running: int
    queued: int
    free_slots: int
    pending_tokens: int
    tokens_per_second: float
    prefix_cache_hits: int
    prefix_cache_queries: int
    prefix_cache_reused_tokens: int
    prefix_cache_bytes: int
    kv_cache_bytes: int
    total_requests: int
    total_finished: int
    total_cancelled: int
    total_prompt_tokens: int
    total_generated_tokens: int
    total_steps: int
    total_prefill_tokens: int = 0  # prompt positions computed by the model (not cache, not fork)
    total_forks: int = 0  # samples that took their prompt's keys/values from a sibling
    kv_cache_usage: float = 0.0  # positions held by running sequences / all positions, 0-1
