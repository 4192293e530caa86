"""Prometheus metrics of the router (served on the metrics port when set).

Besides its own counters, the router republishes what every worker's WatchLoad
stream reports, per worker and summed per model, computed at scrape time from
the live pools (a worker that left the pool leaves the metrics with it): the
autoscaling signals of docs/kubernetes.md without scraping each worker.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

REQUESTS = Counter(
    "tokenyard_router_requests_total",
    "Generation requests finished, by method, model and status.",
    ["method", "model", "code"],
)
TOKENS_IN = Counter(
    "tokenyard_router_prompt_tokens_total", "Prompt tokens of finished requests.", ["model"]
)
TOKENS_OUT = Counter(
    "tokenyard_router_completion_tokens_total", "Tokens relayed to clients.", ["model"]
)
TTFT = Histogram(
    "tokenyard_router_time_to_first_token_seconds",
    "From request arrival to the first token relayed.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN = Histogram(
    "tokenyard_router_inter_token_latency_seconds",
    "Between consecutive messages relayed in one stream.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
AUTH_CACHE = Counter(
    "tokenyard_router_auth_cache_total",
    "Principal cache lookups: hit, miss, negative_hit.",
    ["result"],
)
RATE_LIMITED = Counter(
    "tokenyard_router_rate_limited_total",
    "Requests refused by a limit: rpm, tpm, concurrency, quota, max_tokens.",
    ["limit"],
)
WORKER_HEALTHY = Gauge(
    "tokenyard_router_worker_healthy",
    "1 when the worker is healthy and not ejected, else 0.",
    ["worker", "model"],
)
FAILOVERS = Counter(
    "tokenyard_router_failovers_total",
    "Attempts moved to another worker: before_first_token, mid_stream, full.",
    ["kind"],
)
USAGE_DROPPED = Counter(
    "tokenyard_router_usage_records_dropped_total",
    "Usage records dropped because the buffer was full while auth was down.",
)
LIMITS_BACKEND = Gauge(
    "tokenyard_router_limits_redis_up", "1 when limits are shared in Redis, 0 when local."
)


# Every running WorkerPool (services.router.workers adds and removes itself).
POOLS: weakref.WeakSet[Any] = weakref.WeakSet()

# (suffix, help, value of one worker) for the per-worker gauges.
_WORKER_SIGNALS: tuple[tuple[str, str, Any], ...] = (
    ("running", "Sequences decoding now.", lambda w: w.running),
    ("queued", "Requests waiting for a slot.", lambda w: w.queued),
    ("kv_cache_usage_ratio", "KV-cache utilisation, 0 to 1.", lambda w: w.kv_cache_usage),
    ("tokens_per_second", "Tokens generated per second.", lambda w: w.tokens_per_second),
    ("queue_seconds_p50", "Median queue time, last minute.", lambda w: w.queue_p50),
    ("queue_seconds_p95", "95th percentile queue time, last minute.", lambda w: w.queue_p95),
)


class PoolCollector(Collector):
    """Per-worker and per-model load gauges, read from the pools when scraped."""

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        per_worker = {
            name: GaugeMetricFamily(
                f"tokenyard_router_worker_{name}",
                f"Per worker (WatchLoad): {doc}",
                labels=["worker", "model"],
            )
            for name, doc, _ in _WORKER_SIGNALS
        }
        model_doc = {
            "workers": "Healthy workers serving the model.",
            "running": "Sequences decoding, summed over the model's workers.",
            "queued": "Requests waiting for a slot, summed over the model's workers.",
            "tokens_per_second": "Tokens generated per second, summed over the model's workers.",
            "kv_cache_usage_ratio": "Mean KV-cache utilisation of the model's healthy workers.",
            "queue_seconds_p95": "Largest 95th percentile queue time of the model's workers.",
        }
        sent = CounterMetricFamily(
            "tokenyard_router_worker_requests",
            "Requests (attempts, failovers included) this router sent to the worker.",
            labels=["worker", "model"],
        )
        per_model = {
            name: GaugeMetricFamily(f"tokenyard_router_model_{name}", doc, labels=["model"])
            for name, doc in model_doc.items()
        }
        for pool in list(POOLS):
            for model, workers in pool.by_model():
                for worker in workers:
                    sent.add_metric([worker.address, model], float(worker.attempts))
                    for name, _, value in _WORKER_SIGNALS:
                        per_worker[name].add_metric([worker.address, model], float(value(worker)))
                healthy = [w for w in workers if w.healthy]
                figures = {
                    "workers": len(healthy),
                    "running": sum(w.running for w in workers),
                    "queued": sum(w.queued for w in workers),
                    "tokens_per_second": sum(w.tokens_per_second for w in workers),
                    "kv_cache_usage_ratio": (
                        sum(w.kv_cache_usage for w in healthy) / len(healthy) if healthy else 0.0
                    ),
                    "queue_seconds_p95": max((w.queue_p95 for w in workers), default=0.0),
                }
                for name, value in figures.items():
                    per_model[name].add_metric([model], float(value))
        yield from per_worker.values()
        yield sent
        yield from per_model.values()

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return iter(())  # computed at scrape time: no fixed description


REGISTRY.register(PoolCollector())

RESPONSE_CACHE = Counter(
    "tokenyard_router_response_cache_total",
    "Response cache lookups and writes: hit, miss, store, skip_too_large, error.",
    ["result"],
)
