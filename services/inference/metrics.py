"""Prometheus metrics of an inference worker: tokens, latency, load, prefix cache.

Per-request figures (tokens in and out, time to first token, queue time,
inter-token latency) are recorded as requests run; load figures (queue depth,
running sequences, batch size, KV-cache utilisation, tokens/s, prefix cache hits)
are sampled from the engine's stats by `LoadSampler`. The autoscaling signals
(queue time p50/p95 over the last minute, running and queued requests, KV-cache
utilisation, tokens/s) are documented in docs/kubernetes.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
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
KV_CACHE_USAGE = Gauge(
    "tokenyard_inference_kv_cache_usage_ratio",
    "Share of the KV cache the running sequences hold, 0 to 1.",
)
TOKENS_PER_SECOND = Gauge(
    "tokenyard_inference_tokens_per_second", "Tokens generated per second, recent average."
)
QUEUE_P50 = Gauge(
    "tokenyard_inference_queue_seconds_p50",
    "Median queue time of the requests admitted in the last minute.",
)
QUEUE_P95 = Gauge(
    "tokenyard_inference_queue_seconds_p95",
    "95th percentile queue time of the requests admitted in the last minute.",
)
MODEL_INFO = Gauge(
    "tokenyard_inference_model_info",
    "1, labelled with the model this worker serves (join on it for per-model sums).",
    ["model"],
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


class QueueWindow:
    """Queue times of the requests admitted in the last `window` seconds, for quantiles.

    A Prometheus histogram gives quantiles only through PromQL; the router and a
    plain scrape want them ready, so the worker keeps the recent observations.
    """

    def __init__(self, window: float = 60.0, capacity: int = 4096) -> None:
        self.window = window
        self._seen: deque[tuple[float, float]] = deque(maxlen=capacity)

    def add(self, seconds: float, now: float | None = None) -> None:
        """Record one request's queue time."""
        self._seen.append((time.monotonic() if now is None else now, seconds))

    def quantiles(self, now: float | None = None) -> tuple[float, float]:
        """(p50, p95) of the recent queue times; (0, 0) when none is recent."""
        cutoff = (time.monotonic() if now is None else now) - self.window
        while self._seen and self._seen[0][0] < cutoff:
            self._seen.popleft()
        values = sorted(v for _, v in self._seen)
        if not values:
            return 0.0, 0.0
        return _rank(values, 0.5), _rank(values, 0.95)


def _rank(ordered: list[float], q: float) -> float:
    """The nearest-rank quantile `q` of a sorted, non-empty list."""
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


class LoadSampler:
    """Copies engine stats into the load gauges and counters every `period` seconds."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        period: float = 0.5,
        queue: QueueWindow | None = None,
    ) -> None:
        self._stats = stats
        self._queue = queue
        self._period = period
        self._last: EngineStats | None = None
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        """Take one sample now."""
        now = self._stats()
        last = self._last
        QUEUE_DEPTH.set(now.queued)
        RUNNING.set(now.running)
        KV_CACHE_USAGE.set(now.kv_cache_usage)
        TOKENS_PER_SECOND.set(now.tokens_per_second)
        if self._queue is not None:
            p50, p95 = self._queue.quantiles()
            QUEUE_P50.set(p50)
            QUEUE_P95.set(p95)
        if last is not None:
            steps = now.total_steps - last.total_steps
            tokens = now.total_generated_tokens - last.total_generated_tokens
            BATCH_SIZE.set(tokens / steps if steps > 0 else 0.0)
            PREFIX_HITS.inc(max(now.prefix_cache_hits - last.prefix_cache_hits, 0))
            PREFIX_QUERIES.inc(max(now.prefix_cache_queries - last.prefix_cache_queries, 0))
            PREFIX_REUSED.inc(
                max(now.prefix_cache_reused_tokens - last.prefix_cache_reused_tokens, 0)
            )
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
