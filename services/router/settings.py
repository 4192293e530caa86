"""Router settings: where auth and the workers are, how to route, limits backend.

Built once by the entry point (`tokenyard router serve`) from `TOKENYARD_ROUTER_*`
variables and flags, then passed down. Nothing here reads the environment itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import (
    InternalSettings,
    ObservabilitySettings,
    ServerSettings,
    port_setting,
)
from services.common.requests import max_n_setting
from services.common.settings import (
    parse_address,
    parse_bool,
    parse_choice,
    parse_existing_file,
    parse_list,
    parse_non_negative_float,
    parse_positive_float,
    parse_positive_int,
    parse_url,
    setting,
)

DEFAULT_PORT = 50051
POLICIES = ("least_load", "prefix_affinity", "affinity_key", "round_robin")


def parse_worker_list(raw: str) -> tuple[str, ...]:
    """Comma-separated host:port worker addresses."""
    return tuple(parse_address(part) for part in parse_list(raw))


parse_redis_url = parse_url("redis", "rediss", "unix")


def parse_model_aliases(raw: str) -> tuple[tuple[str, str], ...]:
    """Comma-separated `alias=model` pairs: requests for the alias go to the model."""
    pairs: list[tuple[str, str]] = []
    for part in parse_list(raw):
        alias, sep, model = (p.strip() for p in part.partition("="))
        if not sep or not alias or not model:
            raise ValueError(f"expected ALIAS=MODEL, got {part!r}")
        if alias in dict(pairs) or alias == model:
            raise ValueError(f"alias {alias!r} is given twice or names itself")
        pairs.append((alias, model))
    models = {m for _, m in pairs}
    if clash := sorted(models & {a for a, _ in pairs}):
        raise ValueError(f"{clash[0]!r} is both an alias and a model")
    return tuple(pairs)


@dataclass(frozen=True)
class RouterServerSettings(ServerSettings):
    """The public listener; as every service's, but on port 50051 by default."""

    port: int = port_setting(DEFAULT_PORT)
    max_request_bytes: int = setting(
        "TOKENYARD_{service}_MAX_REQUEST_BYTES",
        parse_positive_int,
        default=4 * 1024 * 1024,
        flag="--max-request-bytes",
        help="Largest request message the router reads (it is buffered before the caller "
        "is authenticated).",
    )
    max_streams_per_connection: int = setting(
        "TOKENYARD_{service}_MAX_STREAMS_PER_CONNECTION",
        parse_positive_int,
        # Room for a backend that multiplexes its whole concurrency on one channel
        # (the reliability suite runs 500 streams on one): streams past the cap are
        # refused (UNAVAILABLE), not queued, by gRPC.
        default=1000,
        flag="--max-streams-per-connection",
        help="Concurrent RPCs one client connection may hold (HTTP/2 max_concurrent_streams).",
    )
    max_concurrent_rpcs: int = setting(
        "TOKENYARD_{service}_MAX_CONCURRENT_RPCS",
        parse_positive_int,
        default=4096,
        flag="--max-concurrent-rpcs",
        help="Concurrent RPCs over all connections; past it a call gets RESOURCE_EXHAUSTED.",
    )

    def grpc_options(self) -> dict[str, int]:
        """The gRPC server options that bound what one caller can make the router hold."""
        return {
            "grpc.max_receive_message_length": self.max_request_bytes,
            "grpc.max_concurrent_streams": self.max_streams_per_connection,
        }


@dataclass(frozen=True, kw_only=True)
class RouterSettings:
    """Everything `tokenyard router serve` needs (prefix TOKENYARD_ROUTER_)."""

    server: RouterServerSettings = field(default_factory=RouterServerSettings)
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    internal: InternalSettings = field(default_factory=InternalSettings)

    auth_address: str = setting(
        "TOKENYARD_{service}_AUTH_ADDRESS",
        parse_address,
        default="127.0.0.1:50052",
        flag="--auth-address",
        help="host:port of the auth service.",
    )
    workers: tuple[str, ...] = setting(
        "TOKENYARD_{service}_WORKERS",
        parse_worker_list,
        default=(),
        flag="--workers",
        help="Comma-separated host:port of inference workers (static list).",
    )
    worker_dns: str | None = setting(
        "TOKENYARD_{service}_WORKER_DNS",
        parse_address,
        default=None,
        flag="--worker-dns",
        help="name:port resolved periodically to find workers (a headless service).",
    )
    model_aliases: tuple[tuple[str, str], ...] = setting(
        "TOKENYARD_{service}_MODEL_ALIASES",
        parse_model_aliases,
        default=(),
        flag="--model-aliases",
        help="Comma-separated ALIAS=MODEL: a request for ALIAS is authorized, limited, "
        "routed and recorded in usage as MODEL.",
    )
    workers_file: Path | None = setting(
        "TOKENYARD_{service}_WORKERS_FILE",
        parse_existing_file,
        default=None,
        flag="--workers-file",
        help="File of worker host:port addresses (one per line, # comments), re-read on "
        "SIGHUP and every DNS interval: workers join and leave without a restart.",
    )
    dns_interval: float = setting(
        "TOKENYARD_{service}_DNS_INTERVAL",
        parse_positive_float,
        default=5.0,
        help="Seconds between re-resolutions of the worker DNS name and re-reads of the "
        "workers file.",
    )
    worker_drain_timeout: float = setting(
        "TOKENYARD_{service}_WORKER_DRAIN_TIMEOUT",
        parse_non_negative_float,
        default=60.0,
        help="Seconds a worker that left the list or DNS keeps its running streams before "
        "they fail over to another worker (it gets no new work meanwhile).",
    )
    policy: str = setting(
        "TOKENYARD_{service}_POLICY",
        parse_choice(*POLICIES),
        default="least_load",
        flag="--policy",
        help="Worker choice: least_load, prefix_affinity, affinity_key or round_robin.",
    )
    prefix_balance_threshold: float = setting(
        "TOKENYARD_{service}_PREFIX_BALANCE_THRESHOLD",
        parse_non_negative_float,
        default=8.0,
        help="prefix_affinity leaves the cached worker when its load exceeds the least "
        "loaded one's by more than this many sequences.",
    )
    prefix_block_chars: int = setting(
        "TOKENYARD_{service}_PREFIX_BLOCK_CHARS",
        parse_positive_int,
        default=64,
        help="Prompt characters per prefix block hashed by prefix_affinity.",
    )
    redis_url: str | None = setting(
        "TOKENYARD_REDIS_URL",
        parse_redis_url,
        default=None,
        secret=True,
        help="Redis for rate limits shared by router replicas (unset: in-process).",
    )
    redis_prefix: str = setting(
        "TOKENYARD_{service}_REDIS_PREFIX",
        default="tokenyard:rl:",
        help="Prefix of every Redis key the router writes.",
    )
    response_cache_ttl: float = setting(
        "TOKENYARD_{service}_RESPONSE_CACHE_TTL",
        parse_positive_float,
        default=3600.0,
        flag="--response-cache-ttl",
        help="Seconds a response cache entry lives (the cache answers only callers whose "
        "role or key sets the response_cache limit).",
    )
    response_cache_max_bytes: int = setting(
        "TOKENYARD_{service}_RESPONSE_CACHE_MAX_BYTES",
        parse_positive_int,
        default=256 * 1024 * 1024,
        flag="--response-cache-max-bytes",
        help="Bytes of the in-process response cache (LRU), used without Redis; with Redis "
        "bound its memory by Redis' maxmemory and an eviction policy.",
    )
    response_cache_max_entry_bytes: int = setting(
        "TOKENYARD_{service}_RESPONSE_CACHE_MAX_ENTRY_BYTES",
        parse_positive_int,
        default=1024 * 1024,
        help="Largest answer the response cache stores; longer ones are not cached.",
    )
    response_cache_prefix: str = setting(
        "TOKENYARD_{service}_RESPONSE_CACHE_PREFIX",
        default="tokenyard:rc:",
        help="Prefix of the response cache's Redis keys.",
    )
    slot_lease: float = setting(
        "TOKENYARD_{service}_SLOT_LEASE",
        parse_positive_float,
        default=60.0,
        help="Seconds a concurrency slot in Redis lives unless renewed (crash safety).",
    )
    auth_cache_ttl: float = setting(
        "TOKENYARD_{service}_AUTH_CACHE_TTL",
        parse_non_negative_float,
        default=5.0,
        help="Seconds a principal is cached when auth gives no cache_ttl.",
    )
    auth_cache_max_ttl: float = setting(
        "TOKENYARD_{service}_AUTH_CACHE_MAX_TTL",
        parse_non_negative_float,
        default=60.0,
        help="Upper bound on the cache time auth may grant.",
    )
    auth_failure_ttl: float = setting(
        "TOKENYARD_{service}_AUTH_FAILURE_TTL",
        parse_non_negative_float,
        default=2.0,
        help="Seconds a rejected credential is remembered as rejected.",
    )
    auth_timeout: float = setting(
        "TOKENYARD_{service}_AUTH_TIMEOUT",
        parse_positive_float,
        default=2.0,
        help="Deadline of one Authenticate call.",
    )
    stream_interval: int = setting(
        "TOKENYARD_{service}_STREAM_INTERVAL",
        parse_positive_int,
        default=1,
        flag="--stream-interval",
        help="Tokens gathered into one message to the client (1: every message as the "
        "worker sends it).",
    )
    usage_flush_interval: float = setting(
        "TOKENYARD_{service}_USAGE_FLUSH_INTERVAL",
        parse_positive_float,
        default=1.0,
        help="Seconds between usage batches sent to auth.",
    )
    usage_batch_size: int = setting(
        "TOKENYARD_{service}_USAGE_BATCH_SIZE",
        parse_positive_int,
        default=100,
        help="Records that trigger an early usage batch (at most 1000 per call).",
    )
    usage_buffer: int = setting(
        "TOKENYARD_{service}_USAGE_BUFFER",
        parse_positive_int,
        default=100_000,
        help="Usage records kept while auth is down; the oldest are dropped past this.",
    )
    load_interval_ms: int = setting(
        "TOKENYARD_{service}_LOAD_INTERVAL_MS",
        parse_positive_int,
        default=250,
        help="Interval asked of workers' WatchLoad streams.",
    )
    ejection_base: float = setting(
        "TOKENYARD_{service}_EJECTION_BASE",
        parse_positive_float,
        default=1.0,
        help="Seconds a failed worker is ejected; doubles per failure in a row.",
    )
    ejection_max: float = setting(
        "TOKENYARD_{service}_EJECTION_MAX",
        parse_positive_float,
        default=30.0,
        help="Longest ejection.",
    )
    ready_timeout: float = setting(
        "TOKENYARD_{service}_READY_TIMEOUT",
        parse_non_negative_float,
        default=10.0,
        help="Longest wait at start for the workers' first answers before health SERVING.",
    )
    http_address: str | None = setting(
        "TOKENYARD_{service}_HTTP_ADDRESS",
        parse_address,
        default=None,
        flag="--http-address",
        help="host:port of the OpenAI-compatible HTTP API (/v1/chat/completions...); unset: off.",
    )
    http_include_usage: bool = setting(
        "TOKENYARD_{service}_HTTP_INCLUDE_USAGE",
        parse_bool,
        default=False,
        help="Every streamed HTTP response ends with a usage chunk, as if the client "
        "asked for it (stream_options.include_usage), for billing by a gateway in front.",
    )
    max_attempts: int = setting(
        "TOKENYARD_{service}_MAX_ATTEMPTS",
        parse_positive_int,
        default=4,
        help="Most workers one request is tried on (failover and resume).",
    )
    max_n: int = max_n_setting()
