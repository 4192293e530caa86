"""Assembles a router from its settings; used by the CLI, tests and the benchmark.

app = RouterApp(settings)
port = await app.start()      # serving, health SERVING
...
await app.stop()              # graceful: streams finish, usage flushed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from services.common.channels import internal_channel
from services.common.server import GrpcServer
from services.router.auth_client import AuthClient
from services.router.core import Deps, RouterCore
from services.router.limits import Limits, LocalLimits
from services.router.relay import Chooser, Relay
from services.router.response_cache import CacheStore, LocalStore, ResponseCache
from services.router.servicer import SERVICE_NAME, RouterServicer, add_router_servicer
from services.router.settings import RouterSettings
from services.router.usage import UsageReporter
from services.router.workers import PoolSettings, WorkerPool

if TYPE_CHECKING:
    from services.router.openai_api.server import HttpServer

log = logging.getLogger("tokenyard.router")


def build_limits(settings: RouterSettings, clock: Callable[[], float] = time.time) -> Limits:
    """Redis-backed limits when TOKENYARD_REDIS_URL is set, in-process otherwise."""
    if settings.redis_url:
        from services.router.redis_limits import RedisLimits

        return RedisLimits(
            settings.redis_url, prefix=settings.redis_prefix, lease=settings.slot_lease, clock=clock
        )
    return LocalLimits(clock)


def build_cache(
    settings: RouterSettings, clock: Callable[[], float] = time.monotonic
) -> ResponseCache:
    """The response cache: in Redis when TOKENYARD_REDIS_URL is set (shared by the
    router replicas), an in-process LRU otherwise. `clock` times the LRU's TTL."""
    store: CacheStore
    if settings.redis_url:
        from services.router.response_cache import RedisStore

        store = RedisStore(settings.redis_url, settings.response_cache_prefix)
    else:
        store = LocalStore(settings.response_cache_max_bytes, clock)
    return ResponseCache(
        store,
        ttl=settings.response_cache_ttl,
        max_entry_bytes=settings.response_cache_max_entry_bytes,
    )


def _http_server(core: RouterCore, settings: RouterSettings) -> HttpServer:
    """The OpenAI-compatible HTTP API over the same core as gRPC."""
    from services.router.openai_api.app import HttpOptions, build_app
    from services.router.openai_api.server import HttpServer, Tls

    assert settings.http_address is not None
    server = settings.server
    tls = None
    if server.tls_cert is not None and server.tls_key is not None:
        tls = Tls(server.tls_cert, server.tls_key, server.tls_client_ca)
    options = HttpOptions(
        force_usage=settings.http_include_usage,
        max_body_bytes=settings.server.max_message_bytes,
    )
    app = build_app(core, options)
    return HttpServer(app, settings.http_address, grace=server.grace_period, tls=tls)


class RouterApp:
    """A router: its server, auth client, worker pool, limits and usage reporter."""

    def __init__(
        self,
        settings: RouterSettings,
        *,
        clock: Callable[[], float] = time.time,
        cache_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.auth_channel = internal_channel(settings.auth_address, settings.internal)
        self.auth = AuthClient(
            self.auth_channel,
            default_ttl=settings.auth_cache_ttl,
            max_ttl=settings.auth_cache_max_ttl,
            failure_ttl=settings.auth_failure_ttl,
            timeout=settings.auth_timeout,
        )
        self.usage = UsageReporter(
            self.auth_channel,
            interval=settings.usage_flush_interval,
            batch_size=settings.usage_batch_size,
            capacity=settings.usage_buffer,
        )
        self.limits = build_limits(settings, clock)
        self.cache = build_cache(settings, cache_clock)
        self.pool = WorkerPool(
            settings.internal,
            PoolSettings(
                load_interval_ms=settings.load_interval_ms,
                ejection_base=settings.ejection_base,
                ejection_max=settings.ejection_max,
                discovery_interval=settings.dns_interval,
                drain_timeout=settings.worker_drain_timeout,
            ),
            static=settings.workers,
            dns=settings.worker_dns,
            workers_file=settings.workers_file,
        )
        chooser = Chooser(
            settings.policy,
            threshold=settings.prefix_balance_threshold,
            block_chars=settings.prefix_block_chars,
        )
        self.relay = Relay(
            self.pool,
            chooser,
            max_attempts=settings.max_attempts,
            interval=settings.stream_interval,
        )
        self.core = RouterCore(
            Deps(
                self.auth,
                self.limits,
                self.pool,
                self.relay,
                self.usage,
                max_n=settings.max_n,
                aliases=dict(settings.model_aliases),
                cache=self.cache,
            )
        )
        self.server = GrpcServer(
            settings.server,
            options=settings.server.grpc_options(),
            maximum_concurrent_rpcs=settings.server.max_concurrent_rpcs,
        )
        self.server.add(add_router_servicer, RouterServicer(self.core), SERVICE_NAME)
        self.port = 0
        self._sighup = False
        self.http: HttpServer | None = None
        if settings.http_address is not None:
            self.http = _http_server(self.core, settings)

    @property
    def address(self) -> str:
        """host:port clients connect to."""
        return f"{self.settings.server.host}:{self.port}"

    async def start(self) -> int:
        """Start background work and serve; health turns SERVING at once."""
        self.auth.start()
        self.usage.start()
        await self.pool.start()
        if self.settings.workers_file is not None:
            # SIGHUP re-reads the workers file (where the process owns the signals).
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.pool.reload_file)
                self._sighup = True
        self.port = await self.server.start()
        # SERVING once each worker answered or failed its first contact (bounded), so a
        # load balancer does not send traffic to a router that knows no worker yet.
        await self.pool.wait_settled(self.settings.ready_timeout)
        if self.http is not None:
            await self.http.start()
        await self.server.set_serving(True)
        return self.port

    @property
    def http_address(self) -> str | None:
        """host:port of the OpenAI-compatible HTTP API, when it is on."""
        if self.http is None:
            return None
        return f"{self.http.address.rpartition(':')[0]}:{self.http.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let running streams finish, flush usage, close channels."""
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        if self.http is None:
            await self.server.stop(grace)
        else:
            await asyncio.gather(self.server.stop(grace), self.http.stop())
        await self.core.drain_background()
        await self.usage.close()
        await self.auth.close()
        await self.pool.close()
        await self.limits.close()
        await self.cache.close()
        await self.auth_channel.close()
