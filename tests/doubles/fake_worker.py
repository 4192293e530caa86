"""A test-double inference worker: real gRPC, no model, deterministic tokens.

It serves the worker's internal surface (GenerationService, WorkerService,
grpc.health.v1) the way `tokenyard inference serve` does, but "generates" token
`(base + position) % vocab` where `base` comes from the prompt, so every worker
produces the same tokens for the same request. That makes a stream resumed on
another worker checkable: a gap or a repeat changes the sequence. A continuation
that does not match what this worker would have produced is refused.

Used by the router's tests, the reliability suite and bench/router_bench.py:
`python -m tests.doubles.fake_worker --port 0 --model m` prints
`PORT <n>` once serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import sys
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2
from tokenyard.generation.v1 import generation_service_pb2 as gen
from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc
from tokenyard.inference.v1 import worker_service_pb2 as wrk
from tokenyard.inference.v1 import worker_service_pb2_grpc as wrk_grpc

from services.common import errors
from services.common.config import ServerSettings
from services.common.server import GrpcServer

VOCAB = 32_000
BLOCK_CHARS = 64


@dataclass
class FakeWorkerConfig:
    """Knobs of the double: capacity, pacing and failure injection."""

    model: str = "fake-model"
    context_length: int = 4096
    max_running: int = 64
    max_queued: int = 64
    token_delay: float = 0.0
    default_max_tokens: int = 16
    prefill_seconds_per_char: float = 0.0
    die_after_tokens: int = 0  # >0: the whole process exits after emitting this many
    service_token: str | None = None
    tokens_per_message: int = 1
    prefix_cache_blocks: int = 100_000  # LRU capacity of the simulated prefix cache
    model_revision: str = "fake-rev-1"  # Describe's content hash of the "weights"


def prompt_text(request: Any) -> str:
    """The input as one string (chat turns joined; token ids as numbers)."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return str(request.prompt)
    if kind == "messages":
        return "".join(f"<{m.role}>{m.content}" for m in request.messages.messages)
    if kind == "token_ids":
        return " ".join(str(i) for i in request.token_ids.ids)
    return ""


def prompt_tokens(request: Any) -> int:
    """Token count of the input: ids as given, one per whitespace-separated word."""
    if request.WhichOneof("input") == "token_ids":
        return len(request.token_ids.ids)
    return max(1, len(prompt_text(request).split()))


def expected_token(request: Any, position: int, index: int = 0) -> int:
    """The token this double emits at `position` of sample `index` (every worker agrees).

    Sample i is seeded with seed + i, as a real worker does.
    """
    seed = (request.sampling.seed if request.sampling.HasField("seed") else 0) + index
    digest = hashlib.blake2b(f"{seed}:{prompt_text(request)}".encode(), digest_size=4).digest()
    return (int.from_bytes(digest, "big") + position) % VOCAB


def token_text(token: int) -> str:
    """Text of one token of the double's vocabulary."""
    return f" t{token}"


@dataclass
class _Load:
    running: int = 0
    queued: int = 0
    pending_tokens: int = 0
    generated: int = 0
    prefix_hits: int = 0
    prefix_queries: int = 0
    prefix_reused: int = 0
    draining: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    prefixes: OrderedDict[bytes, None] = field(default_factory=OrderedDict)


class FakeGeneration(gen_grpc.GenerationServiceServicer):
    """GenerationService of the double."""

    def __init__(self, config: FakeWorkerConfig, load: _Load) -> None:
        self.config, self.load = config, load
        self.emitted_total = 0
        self.requests: list[gen.StreamGenerateRequest] = []

    def _changed(self) -> None:
        self.load.changed.set()

    async def _prefill(self, request: Any) -> None:
        text = prompt_text(request)
        blocks = [text[: (i + 1) * BLOCK_CHARS] for i in range(len(text) // BLOCK_CHARS)]
        self.load.prefix_queries += 1
        cached = 0
        cache = self.load.prefixes
        for block in blocks:
            key = hashlib.blake2b(block.encode(), digest_size=12).digest()
            if key in cache:
                cached = len(block)
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > self.config.prefix_cache_blocks:
            cache.popitem(last=False)
        if cached:
            self.load.prefix_hits += 1
            self.load.prefix_reused += cached
        delay = (len(text) - cached) * self.config.prefill_seconds_per_char
        if delay > 0:
            await asyncio.sleep(delay)

    async def StreamGenerate(self, request: gen.StreamGenerateRequest, context: Any) -> None:
        # Written with context.write so a cancelled call stops generation at once.
        stream = self.produce(request)
        try:
            async for msg in stream:
                await context.write(msg)
        finally:
            await stream.aclose()

    async def produce(
        self, request: gen.StreamGenerateRequest
    ) -> AsyncGenerator[gen.StreamGenerateResponse, None]:
        """The messages of one generation."""
        cfg, load = self.config, self.load
        self.requests.append(request)
        if load.draining:
            raise errors.Unavailable("worker is draining")
        if not request.model:
            raise errors.InvalidArgument("model", "must be set")
        if request.model != cfg.model:
            raise errors.NotFound(f"model {request.model!r} is not served here")
        if load.running >= cfg.max_running:
            raise errors.ResourceExhausted("worker is full", retry_after=0.5)
        max_tokens = (
            request.sampling.max_tokens
            if request.sampling.HasField("max_tokens")
            else cfg.default_max_tokens
        )
        done = list(request.continuation_token_ids)
        for position, token in enumerate(done):
            if token != expected_token(request, position):
                raise errors.InvalidArgument(
                    "continuation_token_ids", f"token {position} is not this generation's"
                )
        if prompt_tokens(request) + max_tokens > cfg.context_length:
            raise errors.InvalidArgument("prompt", "prompt plus max_tokens exceeds the context")
        rid = request.request_id or uuid.uuid4().hex
        samples = request.n or 1
        if samples > 1:
            async for msg in self._samples(request, rid, samples, max_tokens):
                yield msg
            return
        load.running += 1
        load.pending_tokens += max_tokens - len(done)
        self._changed()
        position = len(done)
        try:
            await self._prefill(request)
            while position < max_tokens:
                if cfg.token_delay:
                    await asyncio.sleep(cfg.token_delay)
                n = min(cfg.tokens_per_message, max_tokens - position)
                tokens = [expected_token(request, position + i) for i in range(n)]
                position += n
                load.pending_tokens -= n
                load.generated += n
                self.emitted_total += n
                last = position >= max_tokens
                msg = gen.StreamGenerateResponse(
                    request_id=rid,
                    model=cfg.model,
                    text="".join(token_text(t) for t in tokens),
                    token_ids=tokens,
                )
                if last:
                    msg.finish_reason = gen.FINISH_REASON_LENGTH
                    msg.usage.prompt_tokens = prompt_tokens(request)
                    msg.usage.completion_tokens = position
                yield msg
                if cfg.die_after_tokens and self.emitted_total >= cfg.die_after_tokens:
                    os._exit(1)
        finally:
            load.running -= 1
            load.pending_tokens -= max_tokens - position
            self._changed()

    async def _samples(
        self, request: gen.StreamGenerateRequest, rid: str, samples: int, max_tokens: int
    ) -> AsyncGenerator[gen.StreamGenerateResponse, None]:
        """n > 1: one message per sample and position, interleaved; usage on the last."""
        load = self.load
        load.running += samples
        self._changed()
        try:
            await self._prefill(request)
            for position in range(max_tokens):
                if self.config.token_delay:
                    await asyncio.sleep(self.config.token_delay)
                for index in range(samples):
                    token = expected_token(request, position, index)
                    load.generated += 1
                    self.emitted_total += 1
                    msg = gen.StreamGenerateResponse(
                        request_id=rid,
                        model=self.config.model,
                        text=token_text(token),
                        token_ids=[token],
                        index=index,
                    )
                    if position == max_tokens - 1:
                        msg.finish_reason = gen.FINISH_REASON_LENGTH
                        if index == samples - 1:
                            msg.usage.prompt_tokens = prompt_tokens(request)
                            msg.usage.completion_tokens = samples * max_tokens
                    yield msg
                    if self.config.die_after_tokens and (
                        self.emitted_total >= self.config.die_after_tokens
                    ):
                        os._exit(1)
        finally:
            load.running -= samples
            self._changed()

    async def Generate(self, request: gen.GenerateRequest, context: Any) -> gen.GenerateResponse:
        stream_request = gen.StreamGenerateRequest.FromString(request.SerializeToString())
        out = gen.GenerateResponse(model=self.config.model)
        async for msg in self.produce(stream_request):
            out.request_id = msg.request_id
            out.text += msg.text
            out.token_ids.extend(msg.token_ids)
            if msg.finish_reason:
                out.finish_reason = msg.finish_reason
                out.usage.CopyFrom(msg.usage)
        return out

    async def CountTokens(
        self, request: gen.CountTokensRequest, context: Any
    ) -> gen.CountTokensResponse:
        if request.model != self.config.model:
            raise errors.NotFound(f"model {request.model!r} is not served here")
        return gen.CountTokensResponse(
            model=self.config.model,
            token_count=prompt_tokens(request),
            context_length=self.config.context_length,
        )

    async def ListModels(
        self, request: gen.ListModelsRequest, context: Any
    ) -> gen.ListModelsResponse:
        cfg = self.config
        model = gen.Model(name=cfg.model, context_length=cfg.context_length, workers=1)
        return gen.ListModelsResponse(models=[model])


class FakeWorkerService(wrk_grpc.WorkerServiceServicer):
    """WorkerService of the double: Describe, WatchLoad, Drain."""

    def __init__(self, config: FakeWorkerConfig, load: _Load, worker_id: str) -> None:
        self.config, self.load, self.worker_id = config, load, worker_id

    async def Describe(self, request: wrk.DescribeRequest, context: Any) -> wrk.DescribeResponse:
        cfg = self.config
        return wrk.DescribeResponse(
            worker_id=self.worker_id,
            model=cfg.model,
            context_length=cfg.context_length,
            vocab_size=VOCAB,
            max_running=cfg.max_running,
            max_queued=cfg.max_queued,
            device="cpu",
            dtype="float32",
            version="fake",
            prefix_cache=True,
            model_revision=cfg.model_revision,
        )

    def _report(self) -> wrk.WatchLoadResponse:
        load, cfg = self.load, self.config
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return wrk.WatchLoadResponse(
            running=load.running,
            queued=load.queued,
            free_slots=max(cfg.max_running - load.running, 0),
            pending_tokens=max(load.pending_tokens, 0),
            prefix_cache_hits=load.prefix_hits,
            prefix_cache_queries=load.prefix_queries,
            prefix_cache_reused_tokens=load.prefix_reused,
            draining=load.draining,
            report_time=now,
        )

    async def WatchLoad(
        self, request: wrk.WatchLoadRequest, context: Any
    ) -> AsyncIterator[wrk.WatchLoadResponse]:
        interval = (request.interval_ms or 250) / 1000
        while True:
            self.load.changed.clear()
            yield self._report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.load.changed.wait(), interval)
            # Coalesce bursts of changes into one report per few milliseconds.
            await asyncio.sleep(0.005)

    async def Drain(self, request: wrk.DrainRequest, context: Any) -> wrk.DrainResponse:
        self.load.draining = True
        self.load.changed.set()
        return wrk.DrainResponse(remaining=self.load.running + self.load.queued)


class FakeWorker:
    """A running double: start in-process (tests) or as a process (`main`)."""

    def __init__(self, config: FakeWorkerConfig | None = None, port: int = 0) -> None:
        self.config = config or FakeWorkerConfig()
        self.server = GrpcServer(
            ServerSettings(port=port, grace_period=1.0, reflection=False),
            service_token=self.config.service_token,
        )
        self.load = _Load()
        self.generation = FakeGeneration(self.config, self.load)
        self.port = 0

    @property
    def address(self) -> str:
        """host:port to give the router."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Serve and report SERVING; returns the address."""
        worker_id = f"fake-{uuid.uuid4().hex[:8]}"
        self.server.add(
            gen_grpc.add_GenerationServiceServicer_to_server,
            self.generation,
            "tokenyard.generation.v1.GenerationService",
        )
        self.server.add(
            wrk_grpc.add_WorkerServiceServicer_to_server,
            FakeWorkerService(self.config, self.load, worker_id),
            "tokenyard.inference.v1.WorkerService",
        )
        self.port = await self.server.start()
        await self.server.set_serving(True)
        return self.address

    async def stop(self, grace: float = 0.0) -> None:
        """Stop serving (in-flight streams end)."""
        await self.server.stop(grace)


async def _main(args: argparse.Namespace) -> None:
    config = FakeWorkerConfig(
        model=args.model,
        max_running=args.max_running,
        token_delay=args.token_delay,
        die_after_tokens=args.die_after_tokens,
        prefill_seconds_per_char=args.prefill_us_per_char / 1e6,
        service_token=os.environ.get("TOKENYARD_SERVICE_TOKEN") or None,
        default_max_tokens=args.default_max_tokens,
        prefix_cache_blocks=args.prefix_cache_blocks,
    )
    worker = FakeWorker(config, port=args.port)
    await worker.start()
    print(f"PORT {worker.port}", flush=True)
    await worker.server.wait_for_stop_signal()
    await worker.stop(0.5)


def main(argv: list[str] | None = None) -> None:
    """Run the double as a process until SIGTERM."""
    parser = argparse.ArgumentParser(description="tokenyard test-double worker")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--die-after-tokens", type=int, default=0)
    parser.add_argument("--prefill-us-per-char", type=float, default=0.0)
    parser.add_argument("--default-max-tokens", type=int, default=16)
    parser.add_argument("--prefix-cache-blocks", type=int, default=100_000)
    asyncio.run(_main(parser.parse_args(argv)))
    sys.exit(0)


if __name__ == "__main__":
    main()
