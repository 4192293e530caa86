"""Prometheus metrics of the router (served on the metrics port when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
RESPONSE_CACHE = Counter(
    "tokenyard_router_response_cache_total",
    "Response cache lookups and writes: hit, miss, store, skip_too_large, error.",
    ["result"],
)
