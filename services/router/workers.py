"""The worker pool: discovery, what each worker serves, its health and load.

Workers come from three sources, merged: a static list, a file re-read on SIGHUP
and every `discovery_interval` seconds, and a DNS name re-resolved on the same
interval (a Kubernetes headless service gives one address per pod). A worker
that disappears from every source is retired: no new work goes to it, streams
running there get `drain_timeout` seconds to finish, then its channel closes and
whatever still runs there fails over to another worker (the relay resumes it).
For each worker, a monitor
task calls `Describe`, then follows `grpc.health.v1` Watch and `WatchLoad`;
when either stream breaks the worker is unhealthy until the monitor reconnects.
A worker whose request fails is ejected for a while (doubling per failure in a
row, a circuit breaker) and let back in when that time has passed and its
monitor sees it healthy; a success closes the breaker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.inference.v1 import worker_service_pb2 as wrk
from tokenyard.inference.v1 import worker_service_pb2_grpc as wrk_grpc

from services.common.channels import KEEPALIVE_OPTIONS, internal_credentials
from services.common.config import InternalSettings
from services.common.interceptors import SERVICE_TOKEN_HEADER
from services.router import metrics
from services.router.policies import Candidate
from services.router.settings import parse_worker_list

log = logging.getLogger("tokenyard.router.workers")

GEN = "/tokenyard.generation.v1.GenerationService/"


def _identity(raw: bytes) -> bytes:
    return raw


@dataclass(frozen=True)
class PoolSettings:
    """What the pool needs of RouterSettings."""

    load_interval_ms: int = 250
    ejection_base: float = 1.0
    ejection_max: float = 30.0
    discovery_interval: float = 5.0
    drain_timeout: float = 60.0


class Worker:
    """One worker: its channel, what it serves, its load and its breaker state."""

    def __init__(self, address: str, internal: InternalSettings, pool: PoolSettings) -> None:
        self.address = address
        self.settings = pool
        options: list[tuple[str, Any]] = [
            *KEEPALIVE_OPTIONS,
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            # Reconnect quickly after a worker restarts (default backoff reaches minutes).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        creds = internal_credentials(internal)
        # No client interceptors here: they would wrap every streamed message.
        self.channel = (
            grpc.aio.insecure_channel(address, options=options)
            if creds is None
            else grpc.aio.secure_channel(address, creds, options=options)
        )
        self.metadata: tuple[tuple[str, str], ...] = (
            ((SERVICE_TOKEN_HEADER, internal.service_token),) if internal.service_token else ()
        )
        # Raw bytes out: the relay forwards them without re-serializing.
        self.stream_generate = self.channel.unary_stream(
            GEN + "StreamGenerate",
            request_serializer=gen.StreamGenerateRequest.SerializeToString,
            response_deserializer=_identity,
        )
        self.count_tokens = self.channel.unary_unary(
            GEN + "CountTokens",
            request_serializer=gen.CountTokensRequest.SerializeToString,
            response_deserializer=_identity,
        )
        self.stub = wrk_grpc.WorkerServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.worker_id = address
        self.model: str | None = None
        self.context_length = 0
        self.max_running = 0
        self.max_queued = 0
        # The weights' content hash and dtype: answers of one revision are interchangeable
        # (the response cache's key); "" from a worker that does not report it.
        self.revision = ""
        self.running = self.queued = self.pending_tokens = 0
        self.free_slots = 0
        self.prefix_hits = self.prefix_queries = 0
        self.tokens_per_second = self.kv_cache_usage = 0.0
        self.queue_p50 = self.queue_p95 = 0.0
        self.draining = False
        self.serving = False  # health Watch says SERVING
        self.load_seen = False  # WatchLoad stream is up
        self.inflight = 0  # requests this router has running there
        self.dispatched = 0  # requests sent since the last load report
        self.attempts = 0  # requests (attempts) ever sent there by this router
        self.ejected_until = 0.0
        self.failures = 0
        self.task: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()  # first contact made (healthy) or failed

    # -- state --------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Described, health SERVING, load reports flowing, not draining."""
        return self.model is not None and self.serving and self.load_seen and not self.draining

    def available(self, now: float) -> bool:
        """Healthy and not ejected."""
        return self.healthy and now >= self.ejected_until

    def candidate(self) -> Candidate:
        """This worker as a routing policy sees it."""
        seen = self.running + self.queued + self.dispatched
        load = max(seen, self.inflight)
        return Candidate(self.worker_id, load, 0, self.pending_tokens)

    def eject(self, reason: str) -> None:
        """Take the worker out of rotation for a while (breaker open)."""
        if time.monotonic() < self.ejected_until:
            return  # one incident seen by several requests counts once
        delay = min(self.settings.ejection_base * 2**self.failures, self.settings.ejection_max)
        self.failures += 1
        self.ejected_until = time.monotonic() + delay
        self._gauge()
        log.warning(
            "worker ejected",
            extra={"worker": self.address, "reason": reason, "seconds": round(delay, 2)},
        )

    def succeeded(self) -> None:
        """A request completed: close the breaker."""
        if self.failures:
            self.failures = 0
            self.ejected_until = 0.0
            self._gauge()

    def _gauge(self) -> None:
        if self.healthy:
            self.settled.set()
        up = 1 if self.available(time.monotonic()) else 0
        metrics.WORKER_HEALTHY.labels(self.address, self.model or "").set(up)

    def _apply_load(self, report: wrk.WatchLoadResponse) -> None:
        self.running, self.queued = report.running, report.queued
        self.free_slots, self.pending_tokens = report.free_slots, report.pending_tokens
        self.prefix_hits = report.prefix_cache_hits
        self.prefix_queries = report.prefix_cache_queries
        self.tokens_per_second = report.tokens_per_second
        self.kv_cache_usage = report.kv_cache_usage
        self.queue_p50 = report.queue_time_p50_seconds
        self.queue_p95 = report.queue_time_p95_seconds
        self.draining = report.draining
        self.dispatched = 0
        self.load_seen = True

    # -- monitor ------------------------------------------------------------------

    def start(self) -> None:
        """Start the monitor task."""
        self.task = asyncio.create_task(self._monitor(), name=f"worker {self.address}")

    async def _monitor(self) -> None:
        backoff = 0.1
        while True:
            try:
                reply = await self.stub.Describe(
                    wrk.DescribeRequest(), timeout=5.0, metadata=self.metadata
                )
                self.model = reply.model
                self.worker_id = reply.worker_id or self.address
                self.context_length = reply.context_length
                self.max_running, self.max_queued = reply.max_running, reply.max_queued
                self.revision = (
                    f"{reply.model_revision}/{reply.dtype}" if reply.model_revision else ""
                )
                backoff = 0.1
                await self._watch_both()
            except grpc.aio.AioRpcError as exc:
                self.settled.set()
                log.debug(
                    "worker unreachable", extra={"worker": self.address, "code": exc.code().name}
                )
            self.serving = self.load_seen = False
            self._gauge()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _watch_both(self) -> None:
        """Follow health and load until either stream ends."""
        tasks = {
            asyncio.create_task(self._watch_health()),
            asyncio.create_task(self._watch_load()),
        }
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_health(self) -> None:
        call = self.health_stub.Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for reply in call:
                self.serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                self._gauge()
        finally:
            call.cancel()

    async def _watch_load(self) -> None:
        interval = self.settings.load_interval_ms
        call = self.stub.WatchLoad(
            wrk.WatchLoadRequest(interval_ms=interval), metadata=self.metadata
        )
        try:
            async for report in call:
                self._apply_load(report)
                self._gauge()
        finally:
            call.cancel()

    async def close(self) -> None:
        """Stop monitoring and close the channel (in-flight calls end)."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        metrics.WORKER_HEALTHY.labels(self.address, self.model or "").set(0)
        await self.channel.close()


def parse_workers_file(text: str) -> set[str]:
    """Worker addresses in a workers file: host:port per line or comma-separated, # comments."""
    out: set[str] = set()
    for raw in text.splitlines():
        line = raw.partition("#")[0].strip()
        if line:
            out.update(parse_worker_list(line))
    return out


class WorkerPool:
    """Every known worker, by address, with a per-model view for routing."""

    def __init__(
        self,
        internal: InternalSettings,
        settings: PoolSettings,
        *,
        static: Iterable[str] = (),
        dns: str | None = None,
        workers_file: Path | None = None,
    ) -> None:
        self.internal, self.settings = internal, settings
        self.static, self.dns, self.workers_file = tuple(static), dns, workers_file
        self.workers: dict[str, Worker] = {}
        # Addresses by source ("static", "file", "dns"); the pool holds their union.
        self._sources: dict[str, set[str]] = {"static": set(self.static)}
        self._discovery: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Add the static and file workers, resolve DNS, then follow both."""
        if self.workers_file is not None:
            # At start a bad file is an error; on a reload it only keeps the old list.
            self._sources["file"] = parse_workers_file(self.workers_file.read_text())
        self._apply()
        if self.dns:
            await self._resolve_once()
        if self.dns or self.workers_file is not None:
            self._discovery = asyncio.create_task(self._follow(), name="worker-discovery")
        metrics.POOLS.add(self)

    def set_source(self, source: str, addresses: Iterable[str]) -> None:
        """Replace one source's addresses; workers join or retire to match the union."""
        self._sources[source] = set(addresses)
        self._apply()

    def update(self, addresses: Iterable[str]) -> None:
        """Make the pool hold exactly `addresses` (plus the static list and the file)."""
        self.set_source("dns", addresses)

    def reload_file(self) -> bool:
        """Re-read the workers file (SIGHUP, and every discovery interval); False on error."""
        if self.workers_file is None:
            return False
        try:
            addresses = parse_workers_file(self.workers_file.read_text())
        except (OSError, ValueError) as exc:
            log.warning(
                "workers file not reloaded: keeping the current list",
                extra={"path": str(self.workers_file), "error": str(exc)},
            )
            return False
        if addresses != self._sources.get("file"):
            log.info("workers file changed", extra={"workers": len(addresses)})
            self.set_source("file", addresses)
        return True

    def _apply(self) -> None:
        wanted: set[str] = set().union(*self._sources.values())
        for address in sorted(wanted - self.workers.keys()):
            worker = Worker(address, self.internal, self.settings)
            self.workers[address] = worker
            worker.start()
            log.info("worker added", extra={"worker": address})
        for address in sorted(self.workers.keys() - wanted):
            worker = self.workers.pop(address)
            log.info(
                "worker removed: draining", extra={"worker": address, "streams": worker.inflight}
            )
            task = asyncio.create_task(self._retire(worker))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _retire(self, worker: Worker) -> None:
        # Out of `workers`, it gets no new request; streams running there finish
        # (bounded), then closing the channel makes the rest fail over.
        try:
            deadline = time.monotonic() + self.settings.drain_timeout
            while worker.inflight and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        finally:
            await worker.close()

    async def _resolve_once(self) -> None:
        assert self.dns is not None
        host, _, port = self.dns.rpartition(":")
        host = host.strip("[]")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM
            )
        except OSError as exc:
            log.warning("worker DNS lookup failed", extra={"name": self.dns, "error": str(exc)})
            return
        addresses = set()
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            addresses.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        self.set_source("dns", addresses)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.discovery_interval)
            if self.workers_file is not None:
                self.reload_file()
            if self.dns:
                await self._resolve_once()

    def retiring(self) -> int:
        """Workers removed from the sources whose streams are still finishing."""
        return len(self._closing)

    def by_model(self) -> Iterator[tuple[str, list[Worker]]]:
        """Described workers grouped by model (for the autoscaling gauges)."""
        groups: dict[str, list[Worker]] = {}
        for worker in list(self.workers.values()):
            if worker.model is not None:
                groups.setdefault(worker.model, []).append(worker)
        yield from groups.items()

    def for_model(self, model: str) -> list[Worker]:
        """Workers available now for `model`."""
        now = time.monotonic()
        return [w for w in self.workers.values() if w.model == model and w.available(now)]

    def model_known(self, model: str) -> bool:
        """Whether any worker (healthy or not) has said it serves `model`."""
        return any(w.model == model for w in self.workers.values())

    def context_length(self, model: str) -> int | None:
        """The largest context length the workers of `model` reported (None: none did)."""
        lengths = [w.context_length for w in self.workers.values() if w.model == model]
        return max(lengths, default=0) or None

    def undescribed(self) -> bool:
        """Whether some worker has not yet said what it serves (unreachable so far)."""
        return any(w.model is None for w in self.workers.values())

    def models(self) -> dict[str, list[Worker]]:
        """Healthy workers by model name."""
        out: dict[str, list[Worker]] = {}
        for worker in self.workers.values():
            if worker.model is not None and worker.healthy:
                out.setdefault(worker.model, []).append(worker)
        return out

    async def wait_settled(self, timeout: float) -> None:
        """Wait (bounded) until every worker is healthy or has failed its first contact."""
        waits = [w.settled.wait() for w in self.workers.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout)

    async def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until every known worker is healthy (tests, startup)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.workers and all(w.healthy for w in self.workers.values()):
                return True
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        """Stop discovery and every monitor; close channels."""
        metrics.POOLS.discard(self)
        if self._discovery is not None:
            self._discovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._discovery
        for task in list(self._closing):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker in list(self.workers.values()):
            await worker.close()
        self.workers.clear()
