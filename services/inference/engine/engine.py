"""The inference engine: continuous batching on a compute thread, streams on asyncio.

`Engine.generate` is called on the event loop and returns an async iterator of token
event lists. The model runs on one dedicated thread (torch releases the GIL inside
its kernels, so the loop stays responsive); after each step the thread hands every
stream its new events with a single `call_soon_threadsafe` per event loop.

Why an engine of our own rather than transformers' continuous batching
(`generate_batch` / `init_continuous_batching`): measured by bench/engine_bench.py
on 2-core CPUs, bf16, 16 streams of 128 tokens, `generate_batch` gave 62 tok/s (90
on a later AVX-512 BF16 machine) and grew the process to 7-12 GiB (its paged cache),
while this engine gave 183 (414 on that machine, in 1.5 GiB); it also lacks
per-request seeded sampling, prefix reuse across requests and per-step cancellation
hooks that the worker needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator

import torch

from services.common.requests import Sampling, sampling_error
from services.inference.engine.generic import GenericRunner, select_runner
from services.inference.engine.grammar import GrammarError, Grammars
from services.inference.engine.kv_cache import MIN_KV_POSITIONS, kv_positions
from services.inference.engine.prefix_cache import PrefixCache
from services.inference.engine.runner import Runner
from services.inference.engine.sampling import SampleRow, sample
from services.inference.engine.scheduler import Scheduler
from services.inference.engine.sequence import Sequence
from services.inference.engine.stream import RequestStream
from services.inference.engine.threads import claim_torch_threads, release_default_threads
from services.inference.engine.types import (
    EngineClosed,
    EngineError,
    EngineFull,
    EngineRequest,
    EngineSaturated,
    EngineStats,
    InvalidRequest,
    TokenEvent,
)
from services.inference.model_loading import LoadedModel

__all__ = ["MIN_KV_POSITIONS", "Engine", "kv_positions"]
log = logging.getLogger(__name__)
_RATE_WINDOW_S = 10.0


class Engine:
    """Serves one loaded model to many concurrent requests with continuous batching.

    At most `max_running` sequences decode together; up to `max_queued` more wait, and
    `generate` raises `EngineFull` beyond that. Each step computes at most
    `max_batch_tokens` tokens (one per decoding sequence plus prompt chunks).
    `compute_threads`: in a process that called `confine_torch_threads`, the
    intra-op threads the compute thread claims when it starts (threads.py); None
    leaves torch's thread settings alone. `take_model_weights` frees the loaded
    model's copies of the weights the engine keeps (see `Runner`): for a process
    that serves the model with this engine only. `quantize` ("none", "int8",
    "int4") compresses the fast path's weights (quant.py). The model runs on the fast path
    where `Runner` implements its family, else on the generic path (generic.py),
    where the prefix cache is off; `path` says which.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_running: int,
        max_queued: int,
        max_batch_tokens: int,
        prefix_cache: bool = True,
        prefix_cache_bytes: int = 256 * 2**20,
        prefix_block_size: int = 16,
        kv_cache_bytes: int | None = None,
        compute_threads: int | None = None,
        take_model_weights: bool = False,
        quantize: str = "none",
    ) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        if max_queued < 0:
            raise ValueError("max_queued must not be negative")
        if max_batch_tokens <= max_running:
            raise ValueError("max_batch_tokens must exceed max_running (room for a prefill)")
        if compute_threads is not None and compute_threads < 1:
            raise ValueError("compute_threads must be at least 1")
        self.compute_threads = compute_threads
        self.loaded = loaded
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_batch_tokens = max_batch_tokens
        self.runner: Runner | GenericRunner = select_runner(
            loaded.model, take_weights=take_model_weights, quantize=quantize, gguf=loaded.gguf
        )
        log.info(
            "%s runs on the %s path, weights %s (quantization %s, %d MiB)",
            loaded.name,
            self.runner.path,
            str(loaded.dtype).removeprefix("torch."),
            self.runner.quantization,
            self.runner.weight_bytes() // 2**20,
        )
        if self.runner.from_file:
            log.info(
                "int4: %d projections keep the codes of %s", self.runner.from_file, loaded.gguf
            )
        if take_model_weights and self.runner.released_bytes:
            log.info(
                "engine took the model's weights: %d MiB of copies freed",
                self.runner.released_bytes // 2**20,
            )
        self.context_length = min(loaded.context_length, self.runner.context_length)
        if kv_cache_bytes is not None:
            self.context_length = min(
                self.context_length, kv_positions(self.runner, max_running, kv_cache_bytes)
            )
        prefix_cache = prefix_cache and self.runner.supports_prefix_cache
        cache = PrefixCache(prefix_block_size, prefix_cache_bytes) if prefix_cache else None
        # Structured output: grammars compile off the compute thread (see grammar.py).
        self.grammars = Grammars(loaded.tokenizer, self.runner.vocab_size, loaded.eos_token_ids)
        self._scheduler = Scheduler(
            self.runner,
            max_running=max_running,
            max_batch_tokens=max_batch_tokens,
            context_length=self.context_length,
            eos_token_ids=loaded.eos_token_ids,
            prefix_cache=cache,
            deliver=self._deliver,
            on_removed=self._on_removed,
            grammars=self.grammars,
        )
        self._prefix_cache = cache
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._outstanding = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._idle_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._rate: deque[tuple[float, int]] = deque()
        self._pending_tokens = 0
        self._total_requests = 0
        self._total_prompt_tokens = 0

    @property
    def path(self) -> str:
        """ "fast" (the engine's own forward pass) or "generic" (transformers runs it)."""
        return self.runner.path

    @property
    def prefix_cache_enabled(self) -> bool:
        """Whether prompts reuse cached prefixes (asked for, and the path supports it)."""
        return self._prefix_cache is not None

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts and produces."""
        return self.runner.vocab_size

    # -- lifecycle -------------------------------------------------------------

    def start(self, *, warm: bool = False) -> None:
        """Start the compute thread; with `warm`, return once it has run `warmup`.

        Warming up on the compute thread itself also creates its kernel thread pool
        and the kernels' per-thread-count setup: a worker's first request had a TTFT
        of 35-57 ms when it warmed up on another thread, 32-40 ms this way (later
        requests 25-29). A warm-up that fails is raised here; the engine stays stopped.
        """
        with self._cond:
            if self._closed:
                raise EngineClosed("engine is stopped")
            if self._thread is not None:
                return
            ready = threading.Event()
            failed: list[BaseException] = []
            self._thread = threading.Thread(
                target=self._run,
                args=(ready, warm, failed),
                name=f"engine-{self.loaded.name}",
                daemon=True,
            )
            self._thread.start()
        if warm:
            self.grammars.prepare()
        if self.compute_threads is not None or warm:
            ready.wait()
        if self.compute_threads is not None:
            release_default_threads()
        if failed:
            with self._cond:
                self._closed = True
            raise failed[0]

    async def stop(self) -> None:
        """Stop the compute thread; every pending request ends "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)
        else:
            self._cancel_everything()
        self.grammars.close()

    def warmup(self) -> None:
        """Run one tiny generation so the first request does not pay one-time setup."""
        vocab = self.runner.vocab_size
        prompt = torch.arange(1, 9, dtype=torch.long, device=self.runner.device) % vocab
        config = Sampling(max_tokens=4, temperature=0.7, top_p=0.9, top_k=20, logprobs=2)
        with self._step_lock:
            cache = self.runner.new_cache(1, 16)
            logits = self.runner.prefill(cache, [(0, prompt, 0)])
            for position in range(prompt.shape[0], prompt.shape[0] + 3):
                token = sample(logits, [SampleRow(config, 0, position, [])])[0].token_id
                mask = torch.ones(
                    (1, 1, 1, position + 1), dtype=torch.bool, device=self.runner.device
                )
                pos = torch.tensor([position], device=self.runner.device)
                tok = torch.tensor([token], device=self.runner.device)
                logits = self.runner.decode(
                    cache, tok, pos, self.runner.write_rows(cache, pos), mask
                )

    # -- requests --------------------------------------------------------------

    def _check(self, req: EngineRequest) -> None:
        """The engine's preconditions, which the worker's checks already met.

        An `InvalidRequest` here is a bug in the caller: the user-facing rules are
        `services.common.requests`', and the sampling ones are asserted with them.
        """
        vocab = self.runner.vocab_size
        ids = (*req.prompt_ids, *req.continuation_ids)
        if not req.prompt_ids:
            raise InvalidRequest("prompt_ids", "must not be empty")
        if any(not 0 <= t < vocab for t in ids):
            raise InvalidRequest("prompt_ids", f"token ids must be in [0, {vocab})")
        if len(ids) >= self.context_length:
            raise InvalidRequest(
                "prompt_ids", f"prompt is longer than the context ({self.context_length})"
            )
        problem = sampling_error(req.sampling)
        if problem is not None:
            raise InvalidRequest(problem[0].removeprefix("sampling."), problem[1])
        budget = req.sampling.max_tokens
        if budget is None:
            raise InvalidRequest("max_tokens", "must be resolved before the engine")
        if len(req.continuation_ids) >= budget:
            raise InvalidRequest("continuation_ids", "already reach max_tokens")
        if not 1 <= req.n <= self.max_running:
            raise InvalidRequest("n", f"must be in [1, max_running={self.max_running}]")
        if req.n > 1 and req.continuation_ids:
            raise InvalidRequest("continuation_ids", "cannot resume a request with n > 1")

    def generate(self, req: EngineRequest) -> AsyncIterator[list[TokenEvent]]:
        """Submit `req`; iterate the result for its token events (see module docstring).

        Raises `InvalidRequest`, `EngineFull` (queue full; `EngineSaturated` for a
        sheddable request, negative priority, that finds no free slot) or
        `EngineClosed` at once. Higher `req.priority` is admitted first and
        preempts lower (the preempted stream pauses, then resumes, same tokens);
        `req.tenant`s take turns inside one priority.
        Closing or cancelling the iterator aborts the request within one step.
        With `req.n` > 1 the events of sample i carry `index` i; sample 0 prefills the
        prompt and the others copy its keys/values (where the path keeps its own
        cache), so the prompt is computed once; each counts as one sequence.
        """
        self._check(req)
        loop = asyncio.get_running_loop()
        seed = req.sampling.seed if req.sampling.seed is not None else secrets.randbits(63)
        stream = RequestStream(loop)
        sink = weakref.ref(stream)
        try:
            seqs = [Sequence.create(req, (seed + i) % 2**64, sink, i) for i in range(req.n)]
        except GrammarError as exc:  # the worker checked the continuation against it
            raise InvalidRequest("continuation_ids", str(exc)) from None
        stream.bind(seqs)
        # The generic path's caches cannot be copied: its samples prefill each.
        heads = seqs[:1] if self.runner.supports_prefix_cache else seqs
        heads[0].forks = seqs[len(heads) :]
        with self._cond:
            if self._closed:
                raise EngineClosed("engine is stopped")
            if req.priority < 0 and self._outstanding + req.n > self.max_running:
                raise EngineSaturated(
                    f"sheddable request (priority {req.priority}) refused: "
                    f"{self._outstanding} sequences running or queued, {req.n} more asked "
                    f"(max_running={self.max_running})"
                )
            if self._outstanding + req.n > self.max_running + self.max_queued:
                raise EngineFull(
                    f"{self._outstanding} sequences running or queued, {req.n} more asked "
                    f"(max_running={self.max_running}, max_queued={self.max_queued})"
                )
            self._outstanding += req.n
            self._total_requests += 1
            self._total_prompt_tokens += seqs[0].n_prefill
            self._inbox.extend(heads)
            self._cond.notify()
        return stream

    async def wait_idle(self) -> None:
        """Return once nothing is running or queued (for drain)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._outstanding == 0:
                return
            future: asyncio.Future[None] = loop.create_future()
            self._idle_waiters.append((loop, future))
        await future

    def stats(self) -> EngineStats:
        """A cheap, thread-safe snapshot of load and counters."""
        sched = self._scheduler
        now = time.monotonic()
        with self._cond:
            outstanding = self._outstanding
            rate = list(self._rate)
            pending = self._pending_tokens if outstanding else 0
            requests, prompt_tokens = self._total_requests, self._total_prompt_tokens
        running = min(len(sched.running), outstanding)
        held = sum(s.computed for s in list(sched.running))
        positions = self.max_running * self.context_length
        recent = [(t, n) for t, n in rate if now - t <= _RATE_WINDOW_S]
        span = now - recent[0][0] if len(recent) > 1 else 0.0
        tps = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        pc = self._prefix_cache
        return EngineStats(
            running=running,
            queued=outstanding - running,
            free_slots=self.max_running - running,
            pending_tokens=pending,
            tokens_per_second=tps,
            prefix_cache_hits=sched.prefix_hits,
            prefix_cache_queries=sched.prefix_queries,
            prefix_cache_reused_tokens=sched.prefix_reused_tokens,
            prefix_cache_bytes=pc.nbytes if pc is not None else 0,
            kv_cache_bytes=sched.cache.nbytes(),
            total_requests=requests,
            total_finished=sched.total_finished,
            total_cancelled=sched.total_cancelled,
            total_prompt_tokens=prompt_tokens,
            total_generated_tokens=sched.total_generated,
            total_steps=sched.total_steps,
            total_prefill_tokens=sched.total_prefill_tokens,
            total_forks=sched.total_forks,
            total_preemptions=sched.total_preemptions,
            kv_cache_usage=min(held / positions, 1.0) if positions else 0.0,
        )

    # -- compute thread ----------------------------------------------------------

    def _run(self, ready: threading.Event, warm: bool, failed: list[BaseException]) -> None:
        try:
            if self.compute_threads is not None:
                claim_torch_threads(self.compute_threads)
                log.info("engine compute thread: %d intra-op threads", torch.get_num_threads())
            if warm:
                self.warmup()
        except Exception as exc:
            failed.append(exc)
            return
        finally:
            ready.set()
        sched = self._scheduler
        while True:
            with self._cond:
                while not self._closed and not self._inbox and not sched.has_work():
                    self._cond.wait()
                if self._closed:
                    break
                new, self._inbox = self._inbox, []
            for seq in new:
                sched.add(seq)
            try:
                with self._step_lock:
                    produced = sched.step(time.monotonic())
            except Exception as exc:
                log.exception("engine step failed; failing %d requests", len(sched.running))
                for seq in sched.fail_all():
                    stream = seq.sink()
                    if stream is not None:
                        self._push(stream, EngineError(f"model computation failed: {exc}"))
                produced = 0
            self._wake_idle_waiters()  # after the step's last events went out
            now = time.monotonic()
            pending = sched.pending_tokens()
            with self._cond:
                self._rate.append((now, produced))
                while self._rate and now - self._rate[0][0] > _RATE_WINDOW_S:
                    self._rate.popleft()
                self._pending_tokens = pending
        self._cancel_everything()

    def _cancel_everything(self) -> None:
        with self._cond:
            new, self._inbox = self._inbox, []
        for seq in new:
            self._scheduler.add(seq)
        with self._step_lock:
            self._scheduler.cancel_all()
        self._wake_idle_waiters()

    @staticmethod
    def _push(stream: RequestStream, item: list[TokenEvent] | BaseException) -> None:
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            stream.loop.call_soon_threadsafe(stream.push, item)

    def _deliver(self, batch: list[tuple[Sequence, list[TokenEvent]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, list[TokenEvent]]]]
        by_loop = {}
        for seq, events in batch:
            stream: RequestStream | None = seq.sink()
            if stream is None:  # the consumer dropped its iterator
                seq.aborted = True
                continue
            by_loop.setdefault(stream.loop, []).append((stream, events))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(RequestStream.push_many, items)

    def _on_removed(self, seq: Sequence) -> None:
        with self._cond:
            self._outstanding -= 1

    def _wake_idle_waiters(self) -> None:
        """Resolve `wait_idle` callers once nothing is outstanding (compute thread)."""
        with self._cond:
            if self._outstanding or not self._idle_waiters:
                return
            waiters, self._idle_waiters = self._idle_waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
