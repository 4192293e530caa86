"""Prometheus metrics of an inference worker: tokens, latency, load, prefix cache.

Per-request figures (tokens in and out, time to first token, inter-token latency)
are recorded as requests run; load figures (queue depth, running sequences, batch
size, prefix cache hits) are sampled from the engine's stats by `LoadSampler`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from services.inference.engine.types import EngineStats

PROMPT_TOKENS = Counter(
    "tokenyard_inference_prompt_tokens_total", "Prompt tokens accepted for generation."
)
GENERATED_TOKENS = Counter(
    "tokenyard_inference_generated_tokens_total", "Tokens generated and sent to callers."
)
REQUESTS = Counter(
    "tokenyard_inference_requests_total",
    "Generation requests by how they ended.",
    ["finish_reason"],
)
TTFT = Histogram(
    "tokenyard_inference_time_to_first_token_seconds",
    "From a request's arrival to its first generated token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
QUEUE_TIME = Histogram(
    "tokenyard_inference_queue_seconds",
    "From a request's arrival to getting a slot, where its prefill starts.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
INTER_TOKEN = Histogram(
    "tokenyard_inference_inter_token_latency_seconds",
    "Time between successive tokens of one request.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
)
QUEUE_DEPTH = Gauge("tokenyard_inference_queue_depth", "Requests waiting for a slot.")
RUNNING = Gauge("tokenyard_inference_running_sequences", "Sequences decoding now.")
BATCH_SIZE = Gauge(
    "tokenyard_inference_batch_size",
    "Average tokens sampled per engine step over the last sampling period.",
)
PREFIX_HITS = Counter(
    "tokenyard_inference_prefix_cache_hits_total", "Requests that reused a cached prefix."
)
PREFIX_QUERIES = Counter(
    "tokenyard_inference_prefix_cache_queries_total", "Requests that looked up the prefix cache."
)
PREFIX_REUSED = Counter(
    "tokenyard_inference_prefix_cache_reused_tokens_total",
    "Prompt tokens served from the prefix cache.",
)

PREEMPTIONS = Counter(
    "tokenyard_inference_preemptions_total",
    "Running sequences paused for a higher-priority request (each resumed later).",
)


class LoadSampler:
    """Copies engine stats into the load gauges and counters every `period` seconds."""

    def __init__(self, stats: Callable[[], EngineStats], period: float = 0.5) -> None:
        self._stats = stats
        self._period = period
        self._last: EngineStats | None = None
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """Take one sample now."""
        now = self._stats()
        last = self._last
        QUEUE_DEPTH.set(now.queued)
        RUNNING.set(now.running)
        if last is not None:
            steps = now.total_steps - last.total_steps
            tokens = now.total_generated_tokens - last.total_generated_tokens
            BATCH_SIZE.set(tokens / steps if steps > 0 else 0.0)
            PREFIX_HITS.inc(max(now.prefix_cache_hits - last.prefix_cache_hits, 0))
            PREFIX_QUERIES.inc(max(now.prefix_cache_queries - last.prefix_cache_queries, 0))
            PREFIX_REUSED.inc(
                max(now.prefix_cache_reused_tokens - last.prefix_cache_reused_tokens, 0)
            )
            PREEMPTIONS.inc(max(now.total_preemptions - last.total_preemptions, 0))
        self._last = now

    def start(self) -> None:
        """Sample in the background until `stop`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop sampling (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self._period)
