"""TEST DOUBLE: a real inference worker process whose engine is fake and fast.

The gRPC layer is the real one (services/inference/servicer.py, worker_service.py,
`Worker`, `lenient`, `GrpcServer`): only the model is replaced. `FakeEngine`
emits token `f(prompt, position)` every `token_delay` seconds, so any worker
produces the same tokens for the same prompt and a stream resumed elsewhere is
checkable; it honours capacity (EngineFull), deadlines, aborts, drain and
`stop_token_ids` (the stop token is emitted and counted, finish STOP) like the
real engine. The tokenizer is byte-level (token id = UTF-8 byte, 256 = EOS).

SIGTERM drains it (WatchLoad reports draining, new work is refused, running
streams get `--grace` seconds), then stops it, as a real worker does.

Run: `python -m tests.reliability.fake_engine_worker --port N [--token-delay S]`;
prints `PORT <n>` once serving. The service token comes from TOKENYARD_SERVICE_TOKEN.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any

from tokenyard.generation.v1 import generation_service_pb2_grpc as gen_grpc
from tokenyard.inference.v1 import worker_service_pb2_grpc as worker_grpc

from services.common.config import ServerSettings
from services.common.lenient import lenient
from services.common.logs import configure_logging
from services.common.server import GrpcServer
from services.inference import servicer, worker_service
from services.inference.engine.types import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    NO_TOKEN,
    EngineClosed,
    EngineFull,
    EngineRequest,
    EngineStats,
    TokenEvent,
)
from services.inference.worker import Worker, WorkerInfo

EOS = 256
VOCAB = 257
FIRST, LETTERS = ord("a"), 26


def fake_token(prompt_ids: Sequence[int], position: int) -> int:
    """The token every fake engine emits at `position` after `prompt_ids` (a letter)."""
    digest = hashlib.blake2b(bytes(i % 256 for i in prompt_ids), digest_size=4).digest()
    return FIRST + (int.from_bytes(digest, "big") + position) % LETTERS


def expected_text(prompt: str, count: int) -> str:
    """The text of the first `count` tokens for a raw `prompt` (byte tokenizer)."""
    ids = list(prompt.encode())
    return "".join(chr(fake_token(ids, i)) for i in range(count))


class ByteTokenizer:
    """A transformers-shaped tokenizer: one token per UTF-8 byte, EOS = 256."""

    eos_token_id = EOS
    chat_template = "<|role|>content\\n per turn, then <|assistant|>"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8", errors="replace"))}

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return bytes(i for i in ids if i < EOS).decode("utf-8", errors="replace")

    def apply_chat_template(self, turns: list[dict[str, str]], **_: Any) -> str:
        return "".join(f"<|{t['role']}|>{t['content']}\n" for t in turns) + "<|assistant|>"


class FakeStream:
    """One request's events; closing or cancelling it frees its slot at once."""

    def __init__(self, engine: FakeEngine, req: EngineRequest) -> None:
        self.engine, self.req = engine, req
        self.position = len(req.continuation_ids)
        self.admitted = self.done = False
        self.admitted_at: float | None = None
        self.first = True

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> list[TokenEvent]:
        if self.done:
            raise StopAsyncIteration
        try:
            if not self.admitted:
                await self.engine.slots.acquire()
                self.admitted = True
                self.admitted_at = time.monotonic()  # queueing ended: the queue-time signal
                self.engine.queued -= 1
                self.engine.running += 1
            await asyncio.sleep(self.engine.token_delay)
        except BaseException:
            self._release()
            raise
        req = self.req
        if req.deadline is not None and time.monotonic() >= req.deadline:
            self._release()
            return [TokenEvent(NO_TOKEN, None, (), FINISH_CANCELLED)]
        token = fake_token(req.prompt_ids, self.position)
        self.position += 1
        self.engine.generated += 1
        stopped = token in req.sampling.stop_token_ids
        last = stopped or self.position >= (req.sampling.max_tokens or 0)
        top: tuple[tuple[int, float], ...] = ()
        logprob = None
        if req.sampling.logprobs is not None:
            logprob = -0.5
            top = tuple((FIRST + k, -1.0 - k) for k in range(req.sampling.logprobs))
        if last:
            self._release()
        finish = FINISH_STOP if stopped else FINISH_LENGTH if last else None
        admitted_at, self.first = (self.admitted_at if self.first else None), False
        return [TokenEvent(token, logprob, top, finish, admitted_at=admitted_at)]

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.done:
            return
        self.done = True
        engine = self.engine
        if self.admitted:
            engine.running -= 1
            engine.slots.release()
        else:
            engine.queued -= 1
        engine.finished += 1
        if engine.running + engine.queued == 0:
            for waiter in engine.idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            engine.idle_waiters.clear()


class FakeEngine:
    """Stands in for `Engine`: the methods and counters `Worker` uses, no model."""

    def __init__(
        self, *, max_running: int, max_queued: int, token_delay: float, context_length: int
    ) -> None:
        self.max_running, self.max_queued = max_running, max_queued
        self.token_delay, self.context_length = token_delay, context_length
        self.slots = asyncio.Semaphore(max_running)
        self.running = self.queued = self.requests = self.finished = self.generated = 0
        self.idle_waiters: list[asyncio.Future[None]] = []
        self.closed = False

    def generate(self, req: EngineRequest) -> FakeStream:
        """Queue `req`; EngineFull past capacity, EngineClosed once stopped."""
        if self.closed:
            raise EngineClosed("engine is stopped")
        if self.running + self.queued >= self.max_running + self.max_queued:
            raise EngineFull("every slot and queue place is taken")
        self.queued += 1
        self.requests += 1
        return FakeStream(self, req)

    async def wait_idle(self) -> None:
        """Return once nothing runs or waits (drain)."""
        if self.running + self.queued == 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle_waiters.append(future)
        await future

    def stats(self) -> EngineStats:
        """The counters WatchLoad and ListModels report."""
        return EngineStats(
            running=self.running,
            queued=self.queued,
            free_slots=self.max_running - self.running,
            pending_tokens=0,
            tokens_per_second=0.0,
            prefix_cache_hits=0,
            prefix_cache_queries=0,
            prefix_cache_reused_tokens=0,
            prefix_cache_bytes=0,
            kv_cache_bytes=0,
            total_requests=self.requests,
            total_finished=self.finished,
            total_cancelled=0,
            total_prompt_tokens=0,
            total_generated_tokens=self.generated,
            total_steps=0,
            kv_cache_usage=self.running / self.max_running,
        )


async def serve(args: argparse.Namespace) -> None:
    """Serve the real worker servicers over a FakeEngine until SIGTERM/SIGINT."""
    configure_logging("inference", os.environ.get("TOKENYARD_LOG_LEVEL", "info"), "json")
    engine = FakeEngine(
        max_running=args.max_running,
        max_queued=args.max_queued,
        token_delay=args.token_delay,
        context_length=args.context_length,
    )
    info = WorkerInfo(
        model=args.model,
        context_length=args.context_length,
        vocab_size=VOCAB,
        max_running=args.max_running,
        max_queued=args.max_queued,
        device="fake",
        dtype="none",
        prefix_cache=False,
        version="0.0.0-fake",
    )
    token = os.environ.get("TOKENYARD_SERVICE_TOKEN") or None
    server = GrpcServer(ServerSettings(port=args.port, grace_period=2.0), service_token=token)
    worker = Worker(
        engine,  # type: ignore[arg-type]  # the test double stands in for Engine
        ByteTokenizer(),
        info,
        eos_token_ids=frozenset({EOS}),
        on_drained=lambda: server.set_serving(False),
    )
    server.add(
        lenient(gen_grpc.add_GenerationServiceServicer_to_server),
        servicer.GenerationServicer(worker),
        servicer.SERVICE_NAME,
    )
    server.add(
        lenient(worker_grpc.add_WorkerServiceServicer_to_server),
        worker_service.WorkerServicer(worker),
        worker_service.SERVICE_NAME,
    )
    port = await server.start()
    worker.worker_id = f"fake-{port}"
    await server.set_serving(True)
    print(f"PORT {port}", flush=True)
    try:
        await server.wait_for_stop_signal()
        # As InferenceApp.stop: drain first, so routers move new work elsewhere
        # while the streams here finish.
        await worker.drained(args.grace)
    finally:
        engine.closed = True
        await server.stop()
        await worker.close()


def main(argv: list[str] | None = None) -> None:
    """Parse flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--token-delay", type=float, default=0.01)
    parser.add_argument("--max-running", type=int, default=64)
    parser.add_argument("--max-queued", type=int, default=64)
    parser.add_argument("--context-length", type=int, default=4096)
    parser.add_argument("--grace", type=float, default=2.0, help="drain time on SIGTERM")
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
