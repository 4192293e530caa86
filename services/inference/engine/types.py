"""The engine's public data types: requests, sampling settings, token events, stats."""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
# token_id of an event that carries no token: the "cancelled" end of a stream.
NO_TOKEN = -1
MAX_LOGPROBS = 20


class EngineFull(Exception):
    """Every running slot and queue place is taken; retry later or on another worker."""


class EngineClosed(Exception):
    """The engine is stopped (or stopping) and accepts no new requests."""


class EngineError(Exception):
    """The model computation failed; the request cannot complete."""


class InvalidRequest(ValueError):
    """A request field is out of range; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token; every field applies per request.

    temperature 0 means greedy; top_k 0 and top_p 1 disable those filters; `seed` makes
    the stream reproducible (alone or batched, and across a resume); `logprobs` asks
    for the chosen token's log-probability plus that many top alternatives.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logprobs: int | None = None


@dataclass
class EngineRequest:
    """One generation: prompt tokens, sampling, and optional resume state and deadline.

    `continuation_ids` are tokens an earlier attempt already produced (router
    failover): they count as generated, and a seeded stream continues after them.
    `deadline` is a `time.monotonic()` instant after which the request is cancelled.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    continuation_ids: list[int] = field(default_factory=list)
    deadline: float | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (or, with token_id NO_TOKEN, the end of a cancelled stream).

    `logprob` is the chosen token's log-probability under the model's raw distribution
    (before temperature and filters); `top_logprobs` the most likely alternatives,
    most likely first. `finish` is set on the last event of a stream. The first event
    carries `cached_prompt_tokens` (prompt tokens the prefix cache supplied) and
    `admitted_at`, the `time.monotonic()` instant the request got a slot: queueing
    ended and prefill began there.
    """

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]
    finish: str | None
    cached_prompt_tokens: int = 0
    admitted_at: float | None = None


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
